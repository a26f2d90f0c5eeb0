import numpy as np
import pytest
from PIL import Image

from helpers import loading, vlm


@pytest.fixture(scope="module")
def llava():
    return loading.load_llava("llava-1.6-mistral-7b")


def test_ask_answers_and_is_reproducible(llava):
    model, processor = llava
    image = Image.fromarray((np.random.RandomState(0).rand(40, 56, 3) * 255).astype("uint8"))
    first = vlm.ask(model, processor, image, "What is shown in this image?", max_new_tokens=6)
    assert isinstance(first, str)
    assert vlm.ask(model, processor, image, "What is shown in this image?", max_new_tokens=6) == first


@pytest.mark.parametrize("question", ["", "   ", None])
def test_empty_question(llava, question):
    model, processor = llava
    with pytest.raises(ValueError, match="`question` must be a non-empty string"):
        vlm.ask(model, processor, Image.new("RGB", (32, 32)), question)
