"""Flash PixArt is served as its model card serves it whichever naming the real adapter file has: the trainer's
wrapper naming (the default fixture, what the real file most likely holds: REFERENCE §1b) or diffusers' naming."""

import pytest
import torch

from flashsd.engine import Engine
from flashsd.models import MODELS
from flashsd.runtime import Runtime
from testkit.pixels import max_difference
from testkit.recipes import card_pipeline, card_request, run_card
from testkit.tiny_repos import build_repo_files, pixart_adapter_naming

CPU32 = Runtime(torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def diffusers_named(tmp_path_factory):
    root = tmp_path_factory.mktemp("pixart-diffusers-naming")
    build_repo_files(root, "pixart", adapter_naming="diffusers")
    return root


@pytest.mark.parametrize("naming", ["wrapper", "diffusers"])
def test_pixart_equals_the_model_cards_recipe_with_either_adapter_naming(tiny_weights, diffusers_named, naming):
    root = tiny_weights if naming == "wrapper" else diffusers_named
    assert pixart_adapter_naming(root / MODELS["pixart"].adapter.id) == naming  # the fixture is what it claims
    ours = Engine.load(MODELS["pixart"], root, CPU32).generate(card_request("pixart", num_outputs=2))
    reference = run_card(card_pipeline("pixart", root), "pixart", [1234, 1235])
    for mine, theirs in zip(ours, reference, strict=True):
        assert max_difference(mine.image, theirs) <= 1
    # and the adapter did something: without it the card's images differ
    bare = run_card(card_pipeline("pixart", root, flash=False), "pixart", [1234])
    assert max_difference(ours[0].image, bare[0]) > 1
