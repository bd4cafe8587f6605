import pytest

from pensieve.config import CacheConfig, EngineConfig, SamplingParams


def test_defaults_are_valid():
    assert CacheConfig().block_size == 16
    assert SamplingParams().max_new_tokens is None


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"block_size": 0}, "block_size"),
        ({"block_size": 16.0}, "block_size"),
        ({"num_device_blocks": 0}, "num_device_blocks"),
        ({"num_host_blocks": -1}, "num_host_blocks"),
        ({"disk_dir": 3}, "disk_dir"),
        ({"policy": "fifo"}, "policy"),
        ({"swap_out_watermark": 1.0}, "swap_out_watermark"),
        ({"swap_out_watermark": True}, "swap_out_watermark"),
        ({"decode_reserve": -0.1}, "decode_reserve"),
        ({"share_prefixes": 1}, "share_prefixes"),
    ],
)
def test_cache_config_rejects(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CacheConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": True}, "max_new_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"seed": 1.5}, "seed"),
        ({"stop_token_ids": [1, -2]}, "stop_token_ids"),
        ({"stop_token_ids": "12"}, "stop_token_ids"),
        ({"stop": "END"}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"ignore_eos": 1}, "ignore_eos"),
    ],
)
def test_sampling_params_reject(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"compile": "yes"}, "compile"),
        ({"compile": 1}, "compile"),
        ({"compile_prefill": "no"}, "compile_prefill"),
        ({"compile_prefill": 1}, "compile_prefill"),
        ({"cpu_linear": None}, "cpu_linear"),
        ({"pack_weights": 1}, "pack_weights"),
        ({"cuda_graphs": 1}, "cuda_graphs"),
        ({"cuda_graph_batch_sizes": (4, 2)}, "cuda_graph_batch_sizes"),
        ({"cuda_graph_batch_sizes": ()}, "cuda_graph_batch_sizes"),
        ({"cuda_graph_batch_sizes": [1, 2]}, "cuda_graph_batch_sizes"),
    ],
)
def test_engine_config_rejects(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**kwargs)


def test_configs_are_frozen():
    with pytest.raises(AttributeError):
        CacheConfig().block_size = 8
