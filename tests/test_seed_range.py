"""Seeds range over 0 .. 2**64-1 everywhere: every seed input, validation and the noise itself."""

from __future__ import annotations

import pytest

from tessera.executor import Executor
from tessera.node import MAX_SEED
from tessera.registry import default_registry
from tessera.workflow import InvalidWorkflow


@pytest.fixture(scope="module")
def executor(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeds")
    return Executor(default_registry(), root / "models", root / "in", root / "out", "cpu")


def test_every_seed_input_takes_the_full_unsigned_64_bit_range(executor):
    seeds = [
        (name, i) for name, cls in executor.registry.nodes.items() for i in cls.inputs if i.widget == "seed"
    ]
    assert len(seeds) >= 3  # Seed, the DiT samplers, ARGenerateTokens
    for name, spec in seeds:
        assert (spec.min, spec.max) == (0, 2**64 - 1), name
        assert spec.value_schema()["maximum"] == MAX_SEED


def seed_workflow(value) -> dict:
    return {
        "version": 1,
        "nodes": {
            "s": {"type": "Seed", "inputs": {"seed": value}},
            "img": {"type": "SolidColor", "inputs": {"width": 8, "height": 8}},
            "out": {"type": "PreviewImage", "inputs": {"images": {"node": "img", "output": "image"}}},
        },
    }


def test_the_largest_seed_is_accepted_and_one_more_is_refused_by_name(executor):
    executor.validate(seed_workflow(2**64 - 1))
    with pytest.raises(InvalidWorkflow) as caught:
        executor.validate(seed_workflow(2**64))
    (issue,) = caught.value.issues
    assert (issue.node, issue.input) == ("s", "seed")
    assert "at most 18446744073709551615" in issue.reason


def test_noise_from_the_largest_seed_is_drawn(executor):
    from tessera.engines.latent import seeded_noise

    noise = seeded_noise(2**64 - 1, (2, 4, 2, 2))  # item 1 wraps to seed 0, as the engine documents
    assert noise.shape == (2, 4, 2, 2) and noise.isfinite().all()
    assert not (noise[0] == noise[1]).all()
