import pytest

from helpers import smoke


def test_cap_lowers_and_says_so(capsys):
    assert smoke.is_tiny()
    assert smoke.cap("steps", 25) == smoke.LIMITS["steps"]
    assert "SMOKE MODE: steps 25 -> 4" in capsys.readouterr().out
    assert smoke.cap("steps", 2) == 2  # already within the limit: untouched, silent
    assert capsys.readouterr().out == ""


def test_cap_outside_smoke_mode_is_identity(monkeypatch, capsys):
    monkeypatch.setenv(smoke.ENV, "0")
    assert smoke.cap("steps", 250) == 250 and smoke.cap_size(1024, 768) == (1024, 768)
    assert capsys.readouterr().out == ""


def test_cap_size_keeps_aspect_and_multiples_of_8():
    assert smoke.cap_size(512, 512) == (64, 64)
    assert smoke.cap_size(1024, 640) == (64, 40)
    assert smoke.cap_size(768, 1024) == (48, 64)
    assert smoke.cap_size(2048, 64) == (64, 8)  # never below 8


def test_unknown_limit():
    with pytest.raises(ValueError, match="Unknown smoke limit 'stepz'"):
        smoke.cap("stepz", 3)


def test_use_tiny_sets_the_environment(monkeypatch):
    monkeypatch.setenv(smoke.ENV, "0")
    smoke.use_tiny()
    assert smoke.is_tiny()
    smoke.use_tiny(False)
    assert not smoke.is_tiny()
