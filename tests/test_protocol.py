"""The Generator protocol (pensieve/api.py): StatefulGenerator and Cluster both implement every member of it, with
the same parameters, so the server (typed against it) can drive either."""

import inspect

import pytest

from pensieve import CacheConfig, Capabilities, Generator, StatefulGenerator
from pensieve.cluster import Cluster
from tests.tiny import tiny_model

MEMBERS = [name for name in dir(Generator) if not name.startswith("_")]


def test_the_protocol_has_the_design_api_and_what_a_server_drives():
    design = {"generate", "generate_batch", "stream", "agenerate", "complete", "complete_batch", "fork", "truncate"}
    design |= {"end", "conversations", "stats", "close", "submit", "submit_complete", "abort", "stop", "serve"}
    design |= {"capabilities"}
    assert set(MEMBERS) == design


@pytest.mark.parametrize("cls", [StatefulGenerator, Cluster])
@pytest.mark.parametrize("name", MEMBERS)
def test_each_implementation_has_every_member_with_the_protocol_parameters(cls, name):
    ours, theirs = getattr(Generator, name), getattr(cls, name, None)
    assert theirs is not None, f"{cls.__name__} lacks {name}"
    if isinstance(ours, property):
        assert isinstance(theirs, property), f"{cls.__name__}.{name} is not a property"
        return
    expected = list(inspect.signature(ours).parameters)
    got = list(inspect.signature(theirs).parameters)
    assert got == expected, f"{cls.__name__}.{name}{got} != {expected}"
    assert inspect.iscoroutinefunction(theirs) == inspect.iscoroutinefunction(ours), name


def test_a_generator_is_a_generator_and_says_what_it_can_do(tmp_path):
    model = tiny_model("llama", seed=0)
    with StatefulGenerator(model, None, CacheConfig(block_size=4, num_device_blocks=16)) as gen:
        assert isinstance(gen, Generator)
        shape = model.config
        assert gen.capabilities == Capabilities(disk_tier=False, streamed_complete=True,
                                                max_model_len=shape.max_position_embeddings,
                                                vocab_size=shape.vocab_size)  # fmt: skip
    config = CacheConfig(block_size=4, num_device_blocks=16, disk_dir=str(tmp_path))
    with StatefulGenerator(model, None, config) as gen:
        assert gen.capabilities.disk_tier
