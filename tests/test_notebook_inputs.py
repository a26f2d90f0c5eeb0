"""The notebooks' cells with what a user may type in their forms: blank, broad or odd values stop with a message
naming the form field (STEPS, RUN_NAME, INSTANCE_TOKEN, IMAGE_FOLDER), never an IndexError, and never write outside
the folders named (issue 17, items 1 and 10). Each notebook runs here in this process, cell by cell, its form
replaced by the values given; nbval runs them whole with their defaults."""
import json
from pathlib import Path

import pytest
from IPython.core.inputtransformer2 import TransformerManager

ROOT = Path(__file__).resolve().parents[1]


def run_cells(name: str, upto: int, **form):
    """Run the code cells 0..upto of notebooks/<name> in one namespace, the form cell (code cell 1) followed by
    `form`. Returns the namespace."""
    notebook = json.loads((ROOT / "notebooks" / name).read_text())
    cells = ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"]
    namespace = {"display": print}
    for i, source in enumerate(cells[:upto + 1]):
        exec(compile(TransformerManager().transform_cell(source), f"{name}[{i}]", "exec"), namespace)
        if i == 1:
            namespace.update(form)
    return namespace


@pytest.mark.parametrize("value", ["", "   ", "../elsewhere", "a/b"])
def test_06_refuses_a_run_name_that_is_not_one_folder(value):
    with pytest.raises(ValueError, match="`RUN_NAME` must be a plain folder name"):
        run_cells("06_lora_training.ipynb", 5, RUN_NAME=value, CAPTION_MISSING=False)


@pytest.mark.parametrize("form, field", [({"STEPS": 0}, "STEPS"), ({"LEARNING_RATE": 5}, "LEARNING_RATE"),
                                         ({"RESOLUTION": 500}, "RESOLUTION"), ({"ALPHA": -1}, "ALPHA")])
def test_06_errors_name_the_form_field(form, field):
    with pytest.raises(ValueError, match=f"`{field}` must be"):
        run_cells("06_lora_training.ipynb", 5, CAPTION_MISSING=False, **form)


def test_06_a_blank_dataset_field_means_the_sample_not_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photo.png").write_bytes(b"")   # what must not be touched
    namespace = run_cells("06_lora_training.ipynb", 5, DATASET="  ", CAPTION_MISSING=False, STEPS=2)
    assert namespace["folder"].name == "lora-sample" and namespace["config"].max_train_steps == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.png"]


@pytest.mark.parametrize("token", ["", "  ", "two words"])
def test_07_refuses_an_empty_instance_token(token):
    with pytest.raises(ValueError, match="INSTANCE_TOKEN must be one rare word"):
        run_cells("07_dreambooth.ipynb", 4, INSTANCE_TOKEN=token)


def test_07_strips_the_instance_token():
    namespace = run_cells("07_dreambooth.ipynb", 4, INSTANCE_TOKEN=" sks ", CLASS_NOUN="dog ")
    assert namespace["instance_prompt"] == "a photo of sks dog" and namespace["class_prompt"] == "a photo of a dog"


def test_02_an_empty_folder_stops_with_the_field_not_an_index_error(tmp_path):
    with pytest.raises(ValueError, match="IMAGE_FOLDER .* holds no images"):
        run_cells("02_detailed_captioning.ipynb", 2, IMAGE_FOLDER=str(tmp_path))


def test_02_refuses_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="`IMAGE_FOLDER` is '.', which is the current folder"):
        run_cells("02_detailed_captioning.ipynb", 2, IMAGE_FOLDER=".")


def test_05_a_blank_image_field_means_the_sample_and_a_pasted_path_is_stripped(tmp_path):
    from PIL import Image

    assert run_cells("05_img2img_inpainting.ipynb", 2, IMAGE="   ")["image"].size == (256, 256)   # the sample
    Image.new("RGB", (64, 48), "red").save(tmp_path / "mine.png")
    pasted = f"  '{tmp_path / 'mine.png'}' "
    assert run_cells("05_img2img_inpainting.ipynb", 2, IMAGE=pasted)["image"].size == (64, 48)
