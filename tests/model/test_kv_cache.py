import torch

from service.model.kv_cache import GrowingLayer, KVCache, stack_right_aligned


def _states(batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 2, length, 4, generator=generator),
            torch.randn(batch, 2, length, 3, generator=generator))


def test_appending_gives_the_concatenation_and_reuses_the_buffer() -> None:
    layer = GrowingLayer()
    keys, values = _states(3, 5, 0)
    layer.update(keys, values)
    first_buffer = layer.keys.data_ptr()
    for step in range(1, 20):
        new_keys, new_values = _states(3, 1, step)
        got_keys, got_values = layer.update(new_keys, new_values)
        keys, values = torch.cat([keys, new_keys], dim=2), torch.cat([values, new_values], dim=2)
        assert torch.equal(got_keys, keys) and torch.equal(got_values, values)
    assert layer.keys.data_ptr() == first_buffer  # 24 columns fit the first buffer's headroom: no copy
    assert layer.get_seq_length() == 24


def test_rows_selected_or_columns_trimmed_from_outside_are_respected() -> None:
    cache = stack_right_aligned([[_states(4, 6, 0)]], width=6)
    layer = cache.layers[0]
    keys, values = layer.keys.clone(), layer.values.clone()
    cache.batch_select_indices(torch.tensor([3, 1]))
    layer.keys, layer.values = layer.keys[:, :, 2:], layer.values[:, :, 2:]  # as the engine drops unused padding
    new_keys, new_values = _states(2, 1, 9)
    got_keys, got_values = cache.update(new_keys, new_values, 0)
    assert torch.equal(got_keys, torch.cat([keys[[3, 1], :, 2:], new_keys], dim=2))
    assert torch.equal(got_values, torch.cat([values[[3, 1], :, 2:], new_values], dim=2))


def test_an_empty_cache_grows_layers_on_first_use() -> None:
    cache = KVCache()
    states = _states(2, 3, 1)
    cache.update(*states, 0)
    cache.update(*states, 1)
    assert len(cache.layers) == 2 and cache.get_seq_length() == 3


def test_stacking_aligns_every_row_to_the_right_and_keeps_growing() -> None:
    short, long = [_states(2, 3, 0)], [_states(1, 5, 1)]
    stacked = stack_right_aligned([short, long], width=5)
    keys = stacked.layers[0].keys
    assert keys.shape == (3, 2, 5, 4)
    assert torch.equal(keys[:2, :, 2:], short[0][0]) and not keys[:2, :, :2].any()
    assert torch.equal(keys[2:], long[0][0])
    new_keys, new_values = _states(3, 1, 2)
    got_keys, _ = stacked.update(new_keys, new_values, 0)
    assert torch.equal(got_keys[:, :, 5:], new_keys) and got_keys.data_ptr() == keys.data_ptr()
