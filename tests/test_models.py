"""Downloads from links (issue 11) against a real HTTP server on 127.0.0.1 that speaks Civitai's API and serves
files with Range requests, Content-Disposition names, a token check, a redirect to another host (as Civitai's
pre-signed storage links are) and a connection cut mid-file. And the cached file hashes A1111's PNGs carry."""
import hashlib
import http.server
import json
import re
import threading

import pytest

from helpers import models, storage

WEIGHTS = bytes(range(256)) * 4096 + b"end"   # 1 MiB and a bit: several chunks


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.files = {"dreamshaper_8.safetensors": WEIGHTS, "style.safetensors": b"lora" * 1000,
                      "model.ckpt": b"pickle", "page.html": b"<html>log in</html>"}
        self.versions = {}        # id -> (file name, type, base model, sha256 or None, needs a token)
        self.gets = []            # (path, Range header)
        self.cut_after = None     # bytes sent before the connection is cut (once)
        self.storage_auth = []    # Authorization headers that reached the storage host

    @property
    def base(self):
        return f"http://127.0.0.1:{self.server_address[1]}"

    def storage_url(self, name):   # another host name for the same server: a redirect across hosts
        return f"http://localhost:{self.server_address[1]}/files/{name}"


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def send(self, code, body=b"", kind="application/octet-stream", headers=()):
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        for key, value in headers:
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        server = self.server
        server.gets.append((self.path, self.headers.get("Range")))
        if m := re.match(r"/api/v1/model-versions/(\d+)$", self.path):
            name, kind, base, sha, _ = server.versions[int(m.group(1))]
            body = {"id": int(m.group(1)), "baseModel": base, "model": {"type": kind, "name": name},
                    "files": [{"name": name, "primary": True, "sizeKB": len(server.files[name]) / 1024,
                               "hashes": {"SHA256": (sha or hashlib.sha256(server.files[name]).hexdigest()).upper()},
                               "downloadUrl": f"{server.base}/api/download/models/{m.group(1)}"}]}
            return self.send(200, json.dumps(body).encode(), "application/json")
        if m := re.match(r"/api/v1/models/(\d+)$", self.path):
            version = int(m.group(1)) * 10
            name, kind, base, _, _ = server.versions[version]
            body = {"id": int(m.group(1)), "type": kind, "name": name, "modelVersions": [
                {"id": version, "baseModel": base, "downloadUrl": f"{server.base}/api/download/models/{version}",
                 "files": [{"name": name, "primary": True, "sizeKB": len(server.files[name]) / 1024, "hashes": {},
                            "downloadUrl": f"{server.base}/api/download/models/{version}"}]}]}
            return self.send(200, json.dumps(body).encode(), "application/json")
        if m := re.match(r"/api/download/models/(\d+)$", self.path):
            name, *_, needs_token = server.versions[int(m.group(1))]
            if needs_token and self.headers.get("Authorization") != "Bearer secret-token":
                return self.send(401, b'{"error": "Unauthorized"}', "application/json")
            return self.send(302, headers=[("Location", server.storage_url(name))])
        if (m := re.match(r"/files/(.+)$", self.path)) and m.group(1) in server.files:
            if self.headers.get("Authorization"):   # a pre-signed URL refuses a second authorisation
                server.storage_auth.append(self.headers["Authorization"])
                return self.send(400, b"Only one auth mechanism allowed", "text/plain")
            data = server.files[m.group(1)]
            kind = "text/html" if m.group(1).endswith(".html") else "application/octet-stream"
            disposition = [("Content-Disposition", f'attachment; filename="{m.group(1)}"')]
            start = 0
            if r := re.match(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or ""):
                start = int(r.group(1))
                end = int(r.group(2)) if r.group(2) else len(data) - 1
                if start >= len(data):
                    return self.send(416, headers=[("Content-Range", f"bytes */{len(data)}")])
                return self.send(206, data[start:end + 1], kind, disposition + [
                    ("Content-Range", f"bytes {start}-{end}/{len(data)}")])
            if server.cut_after is not None:
                cut, server.cut_after = server.cut_after, None
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Content-Type", kind)
                self.end_headers()
                self.wfile.write(data[:cut])
                self.wfile.flush()
                self.close_connection = True
                return None
            return self.send(200, data, kind, disposition)
        return self.send(404, b"not found", "text/plain")


@pytest.fixture
def server(monkeypatch, tmp_path):
    httpd = Server()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv(models.CIVITAI_API_ENV, httpd.base + "/api/v1")
    monkeypatch.setenv(storage.ENV_HOME, str(tmp_path / "home"))
    monkeypatch.setenv(storage.ENV_CACHE, str(tmp_path / "cache"))
    monkeypatch.delenv("CIVITAI_TOKEN", raising=False)
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def files_fetched(server):
    return [path for path, _ in server.gets if path.startswith("/files/")]


def test_a_civitai_download_link_is_named_verified_and_reused_without_a_second_request(server):
    server.versions[128713] = ("dreamshaper_8.safetensors", "Checkpoint", "SD 1.5", None, False)
    link = f"{server.base}/api/download/models/128713"
    path = models.download(link, progress=False)
    assert path == storage.project_paths().models / "checkpoints" / "dreamshaper_8.safetensors"
    assert path.read_bytes() == WEIGHTS and not list(path.parent.glob(".*"))   # no part left
    requests = len(server.gets)
    assert models.download(link, progress=False) == path and len(server.gets) == requests   # not one GET more


def test_a_civitai_model_page_gives_its_latest_version(server):
    server.versions[120] = ("style.safetensors", "LORA", "SD 1.5", None, False)
    info = models.remote(f"{server.base}/models/12/some-style")
    assert (info.name, info.kind, info.base_model, info.family) == ("style.safetensors", "lora", "SD 1.5", "sd15")
    path = models.download(f"{server.base}/models/12/some-style", progress=False)
    assert path.parent.name == "loras" and path.read_bytes() == b"lora" * 1000


def test_a_cut_transfer_resumes_from_the_bytes_it_has(server):
    link = f"{server.base}/files/dreamshaper_8.safetensors"
    server.cut_after = 300_000
    with pytest.raises(models.DownloadError, match="was cut after"):
        models.download(link, progress=False)
    folder = storage.project_paths().models / "checkpoints"
    [part] = folder.glob(".download-*.part")
    assert part.stat().st_size == 300_000 and not (folder / "dreamshaper_8.safetensors").exists()
    path = models.download(link, progress=False)
    assert path.read_bytes() == WEIGHTS and server.gets[-1] == ("/files/dreamshaper_8.safetensors", "bytes=300000-")
    assert not part.exists()


def test_a_hash_mismatch_is_refused_and_the_bad_file_is_not_kept(server):
    server.versions[5] = ("dreamshaper_8.safetensors", "Checkpoint", "SD 1.5", "ab" * 32, False)
    with pytest.raises(models.DownloadError, match="does not match Civitai's SHA256"):
        models.download(f"{server.base}/api/download/models/5", progress=False)
    assert list((storage.project_paths().models / "checkpoints").iterdir()) == []


def test_a_lora_for_sdxl_is_refused_for_an_sd15_pipeline_before_its_bytes_are_fetched(server):
    server.versions[7] = ("style.safetensors", "LORA", "Pony", None, False)
    with pytest.raises(ValueError, match=r"this LoRA is for Pony \(sdxl\), and the pipeline is sd15"):
        models.download(f"{server.base}/api/download/models/7", kind="lora", family="sd15", progress=False)
    assert files_fetched(server) == []


def test_a_link_that_needs_a_token_says_how_to_set_it_and_the_token_never_reaches_the_storage_host(server,
                                                                                                  monkeypatch):
    server.versions[9] = ("style.safetensors", "LORA", "SD 1.5", None, True)
    link = f"{server.base}/api/download/models/9"
    with pytest.raises(models.DownloadError, match="needs a token .*CIVITAI_TOKEN as a Colab secret"):
        models.download(link, progress=False)
    monkeypatch.setenv("CIVITAI_TOKEN", "secret-token")
    assert models.download(link, progress=False).read_bytes() == b"lora" * 1000
    assert server.storage_auth == []


@pytest.mark.parametrize("name, message", [("page.html", "gave a web page, not a model file"),
                                           ("model.ckpt", "not a .safetensors")])
def test_a_web_page_or_a_pickle_is_refused_and_nothing_is_left(server, name, message):
    with pytest.raises(models.DownloadError, match=message):
        models.download(f"{server.base}/files/{name}", progress=False)
    folder = storage.project_paths().models / "checkpoints"
    assert list(folder.iterdir()) == []


def test_an_unknown_host_and_a_missing_file_are_one_line_each(server):
    with pytest.raises(models.DownloadError, match="Cannot reach http://no-such-host.invalid/"):
        models.download("http://no-such-host.invalid/model.safetensors", progress=False)
    with pytest.raises(models.DownloadError, match="gave HTTP 404"):
        models.download(f"{server.base}/files/missing.safetensors", progress=False)


def test_a_full_disk_is_refused_before_the_download_with_the_figures(server, monkeypatch):
    import collections
    import shutil

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(models.DownloadError, match=r"needs 1\.0 MiB and .* has 1000 B free"):
        models.download(f"{server.base}/files/dreamshaper_8.safetensors", progress=False)


def test_file_hashes_are_computed_once_and_again_when_the_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv(storage.ENV_CACHE, str(tmp_path / "cache"))
    path = tmp_path / "model.safetensors"
    path.write_bytes(WEIGHTS)
    assert models.file_hash(path) == hashlib.sha256(WEIGHTS).hexdigest()
    reads = []
    real_open = type(path).open
    monkeypatch.setattr(type(path), "open", lambda self, *a, **k: reads.append(self) or real_open(self, *a, **k))
    assert models.file_hash(path) == hashlib.sha256(WEIGHTS).hexdigest() and path not in reads   # from the cache
    path.write_bytes(b"other")
    assert models.file_hash(path) == hashlib.sha256(b"other").hexdigest()


@pytest.fixture(scope="module")
def sd15_file(tmp_path_factory):
    """The tiny SD 1.5 as one A1111 checkpoint file."""
    from helpers import loading
    from helpers.training import single_file

    pipe = loading.load_sd("sd15")
    return single_file.save_single_file(pipe, tmp_path_factory.mktemp("file") / "tinyshaper_v1.safetensors",
                                        half=False)


def test_a_checkpoint_behind_a_link_is_downloaded_once_and_its_pngs_name_it_as_a1111_does(server, sd15_file,
                                                                                         tmp_path):
    from helpers import diffusion, images, loading

    server.files[sd15_file.name] = sd15_file.read_bytes()
    link = f"{server.base}/files/{sd15_file.name}"
    made = []
    for _ in range(2):   # two runs: the second downloads nothing
        pipe = loading.load_sd(link)
        result = diffusion.generate(pipe, "a lighthouse", num_inference_steps=2, width=64, height=64, seed=5,
                                    progress=False)
        made.append(images.read_parameters(result.save(tmp_path / "out")[0]))
    assert files_fetched(server) == [f"/files/{sd15_file.name}"]
    short = hashlib.sha256(sd15_file.read_bytes()).hexdigest()[:10]
    assert made[0]["Model"] == "tinyshaper_v1" and made[0]["Model hash"] == short
    assert made[0] == made[1]   # the same file, the same image's parameters (seed included)


def test_a_lora_link_for_another_base_model_is_refused_before_download_and_loaded_loras_list_their_hashes(
        server, sd, tmp_path):
    from helpers import diffusion, lora
    from test_lora import make_lora

    server.versions[11] = ("style.safetensors", "LORA", "SDXL 1.0", None, False)
    with pytest.raises(ValueError, match=r"this LoRA is for SDXL 1.0 \(sdxl\), and the pipeline is sd15"):
        lora.load_lora(sd, f"{server.base}/api/download/models/11")
    assert files_fetched(server) == []
    path = make_lora("sd15", tmp_path)
    name = lora.load_lora(sd, str(path), scale=0.5)
    try:
        result = diffusion.generate(sd, "a cat", num_inference_steps=2, width=64, height=64, seed=1, progress=False)
    finally:
        lora.unload_loras(sd)
    short = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert f'Lora hashes: "{name}: {short}"' in result.parameters[0]


def test_the_download_command_fetches_ahead_of_time_and_reuses(server, capsys):
    from helpers import cli

    server.versions[21] = ("style.safetensors", "LORA", "SD 1.5", None, False)
    link = f"{server.base}/api/download/models/21"
    assert cli.main(["download", link, "--no-progress"]) == 0
    path = storage.project_paths().models / "loras" / "style.safetensors"
    assert str(path) in capsys.readouterr().out and path.is_file()
    assert cli.main(["download", link, "--no-progress"]) == 0 and "Already downloaded" in capsys.readouterr().out
    assert cli.main(["download", f"{server.base}/files/page.html"]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_a_lora_trains_on_a_checkpoint_behind_a_link_and_names_it_as_kohya_does(server, sd15_file, tmp_path):
    from conftest import draw_dataset
    from helpers.training import export, loop

    server.files[sd15_file.name] = sd15_file.read_bytes()
    dataset = draw_dataset(tmp_path / "data" / "2_sks", [(64, 64)] * 2, ["a photo of sks"] * 2)
    config = loop.TrainConfig(dataset=str(dataset), run_dir=str(tmp_path / "run"), resolution=64, rank=4, alpha=4,
                              max_train_steps=2, checkpoint_every=2, trigger="sks",
                              base_model=f"{server.base}/files/{sd15_file.name}")
    result = loop.train_lora(config, progress=False)
    metadata = export.read_lora_metadata(result.lora_path.parent / "sks.safetensors")
    assert metadata["ss_sd_model_name"] == "tinyshaper_v1.safetensors" and result.family == "sd15"
    data = sd15_file.read_bytes()   # kohya's two hashes of the base model: A1111's old one and the file's SHA256
    assert metadata["ss_sd_model_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert metadata["ss_new_sd_model_hash"] == hashlib.sha256(data).hexdigest()
    assert files_fetched(server) == [f"/files/{sd15_file.name}"]


def test_a_link_is_planned_before_any_byte_is_fetched(server, sd15_file):
    from helpers import planner

    server.versions[31] = ("big_xl.safetensors", "Checkpoint", "Pony", None, False)
    server.files["big_xl.safetensors"] = b"never fetched"
    plan = planner.plan(f"{server.base}/api/download/models/31", "t4")
    assert "planned as sdxl" in plan.model and files_fetched(server) == []
    assert plan.vram_peak > 0
    with pytest.raises(planner.PlanUnavailable, match="does not say which architecture"):
        planner.plan(f"{server.base}/files/{sd15_file.name}", "t4")
    server.files[sd15_file.name] = sd15_file.read_bytes()
    models.download(f"{server.base}/files/{sd15_file.name}", progress=False)
    assert planner.plan(f"{server.base}/files/{sd15_file.name}", "t4").model == sd15_file.name   # the file itself


def test_generate_from_the_cli_with_a_link_writes_the_models_name_and_hash(server, sd15_file, tmp_path, capsys):
    from helpers import cli, images

    server.files[sd15_file.name] = sd15_file.read_bytes()
    link = f"{server.base}/files/{sd15_file.name}"
    assert cli.main(["generate", "a lighthouse", "--model", link, "--steps", "2", "--width", "64", "--height", "64",
                     "--seed", "3", "--out", str(tmp_path / "out")]) == 0
    [png] = (tmp_path / "out").glob("*.png")
    parameters = images.read_parameters(png)
    assert parameters["Model"] == "tinyshaper_v1"
    assert parameters["Model hash"] == hashlib.sha256(sd15_file.read_bytes()).hexdigest()[:10]


def test_the_benchmark_takes_a_link_and_downloads_it_before_any_timing(server, sd15_file):
    from helpers import bench

    server.files[sd15_file.name] = sd15_file.read_bytes()
    link = f"{server.base}/files/{sd15_file.name}"
    result = bench.run_benchmark([link], prompts=["a red square"], warmup=0, quality=False, progress=False)
    [row] = result.rows
    assert row["error"] is None and row["model"].endswith(sd15_file.name)
    assert files_fetched(server) == [f"/files/{sd15_file.name}"]


def test_a_link_of_the_wrong_kind_is_refused_before_download(server):
    server.versions[41] = ("style.safetensors", "LORA", "SD 1.5", None, False)
    with pytest.raises(ValueError, match="is a lora on Civitai, not a checkpoint"):
        models.download(f"{server.base}/api/download/models/41", kind="checkpoint", progress=False)
    assert files_fetched(server) == []
