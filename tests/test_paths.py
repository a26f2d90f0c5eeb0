"""Paths a user types: a blank one never means the current folder; broad folders are refused (issue 17, item 1)."""
from pathlib import Path

import pytest

from helpers import captions, paths
from helpers.training import datasets


@pytest.mark.parametrize("value", ["", " ", "\t\n", None, '" "'])
def test_a_blank_path_is_refused_naming_the_field(value):
    with pytest.raises(ValueError, match="`dataset`"):
        paths.user_path(value, "dataset")


def test_pasted_quotes_and_spaces_are_stripped(tmp_path):
    assert paths.user_path(f'  "{tmp_path}" ', "dataset") == tmp_path


@pytest.mark.parametrize("where", [".", "~", "/"])
def test_broad_folders_are_refused(where, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="name one folder of its own"):
        paths.refuse_broad(paths.user_path(where, "dataset"), "dataset")


def test_prepare_folder_of_a_blank_path_is_an_error_not_the_current_folder(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photo.png").write_bytes(b"")
    for call in (datasets.prepare_folder, datasets.find_items):
        with pytest.raises(ValueError, match="`dataset`"):
            call(" ")
    with pytest.raises(ValueError, match="current folder"):
        datasets.find_items(".")


def test_a_dataset_folder_of_its_own_is_accepted(tmp_path):
    folder = tmp_path / "my_style"
    folder.mkdir()
    assert datasets.prepare_folder(f" {folder} ") == folder


def test_a_trigger_with_a_line_break_is_refused():
    with pytest.raises(ValueError, match="line break"):
        captions.with_trigger("a dog", "sks\ndog")


@pytest.mark.parametrize("max_chars", [-1, 0, 2.5, True])
def test_clean_caption_refuses_a_bad_max_chars(max_chars):
    with pytest.raises(ValueError, match="max_chars"):
        captions.clean_caption("a red barn. in snow", "detailed", max_chars=max_chars)


def test_clean_caption_leaves_no_trailing_space():
    assert not captions.clean_caption("a red barn in the snow at dusk", "detailed", max_chars=9).endswith(" ")


@pytest.mark.parametrize("text, name", [("../../escape", "_.._escape"), ("a/b", "a_b"), ("a\\b", "a_b"),
                                        ("sks:dog", "sks_dog"), ("<lora>", "_lora_"), ("CON", "_CON"),
                                        ("nul.txt", "_nul.txt"), (" .. ", "output"), ("", "output"), (None, "output"),
                                        ("tab\there", "tab_here"), ("日本 cat", "日本 cat"), ("sks", "sks")])
def test_file_names_made_from_user_text_stay_in_their_folder(text, name):
    assert paths.safe_file_name(text) == name
    assert paths.safe_file_name("x" * 300) == "x" * 100
