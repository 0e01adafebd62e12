"""The preallocated key/value cache (`latentprobe.model.kv_cache`) against transformers' DynamicCache: whole decodes,
sweeps from one prefill, controls, teacher-forced answer slots and a cache that outgrows its reserve give the same
ids, latent vectors and answer logits bit for bit; the cache's own operations (load, crop, repeat, select, deep
copy, appended rows) act on the used columns only and leave no shared storage behind; ``kv_cache="auto"``
preallocates only large caches."""

import copy

import pytest
import torch

from latentprobe.errors import LatentProbeError
from latentprobe.interventions import LatentNoise, LatentStats, RowBinding
from latentprobe.model.decoding import DecodeConfig, LatentDecoder, prefill_without_start
from latentprobe.model import kv_cache
from latentprobe.model.kv_cache import PreallocatedCache, PreallocatedLayer, append_rows, decode_cache
from latentprobe.model.protocol import LVR, MONET
from transformers import DynamicCache

from decoding_helpers import ScriptedDecoder, make_instances, with_protocol

SIZES = [(56, 56), (84, 112), (112, 56), (56, 84)]


def _equal_results(a, b):
    assert torch.equal(a.sequences, b.sequences)
    assert torch.equal(a.attention_mask, b.attention_mask)
    assert torch.equal(a.position_ids, b.position_ids)
    assert torch.equal(a.input_kinds, b.input_kinds)
    assert torch.equal(a.latent_inputs, b.latent_inputs)
    for x, y in zip(a.rows, b.rows, strict=True):
        assert x.generated_ids == y.generated_ids and x.stop_reason == y.stop_reason
        assert x.answer_slot == y.answer_slot
        assert torch.equal(x.latent_vectors, y.latent_vectors)
        if x.answer_logits is None:
            assert y.answer_logits is None
        else:
            assert torch.equal(x.answer_logits, y.answer_logits)


def _both(subject, config, fn, decoder_class=LatentDecoder, **kwargs):
    out = []
    for kv in ("dynamic", "preallocated"):
        decoder = decoder_class(subject, config, **kwargs)
        decoder.kv_cache = kv
        out.append(fn(decoder))
    return out


def test_auto_preallocates_large_caches_only(tiny_subject, tmp_path, monkeypatch):
    batch = tiny_subject.encode(make_instances(tmp_path, SIZES[:2]))
    decoder = LatentDecoder(tiny_subject, DecodeConfig(max_new_tokens=6))
    assert decoder.kv_cache == "auto"
    prefill = decoder.prefill(batch)
    assert type(prefill.cache) is DynamicCache  # a prefill's cache is transformers' own
    decoder.decode(prefill)
    assert type(decoder.last_cache) is DynamicCache  # a tiny cache: copying it is cheaper
    monkeypatch.setattr(kv_cache, "AUTO_PREALLOCATE_BYTES", 1)
    decoder.decode(prefill, repeats=2)
    assert isinstance(decoder.last_cache, PreallocatedCache)
    assert all(isinstance(layer, PreallocatedLayer) for layer in decoder.last_cache.layers)
    for kind in ("preallocated", "dynamic"):
        LatentDecoder(tiny_subject, kv_cache=kind).decode(prefill)
    with pytest.raises(LatentProbeError, match="kv_cache"):
        LatentDecoder(tiny_subject, kv_cache="static")


def test_latent_decoding_with_answer_slots_is_bit_identical(tiny_subject, tmp_path):
    batch = tiny_subject.encode(make_instances(tmp_path, SIZES))
    a, b = _both(tiny_subject, DecodeConfig(max_new_tokens=14), lambda d: d.run(batch))
    assert {row.answer_slot for row in a.rows} >= {"forced"}
    _equal_results(a, b)


def test_layouts_and_model_chosen_starts_are_bit_identical(tiny_subject, tmp_path):
    start = tiny_subject.tokenizer.convert_tokens_to_ids(MONET.start_token)
    script = {(0, 0): start, (1, 2): start, (2, 5): start}
    for layout in ("inference", "training"):
        subject = with_protocol(tiny_subject, MONET.with_steps(3).with_layout(layout), force_start=False)
        batch = subject.encode(make_instances(tmp_path, SIZES))
        a, b = _both(subject, DecodeConfig(max_new_tokens=12), lambda d: d.run(batch), ScriptedDecoder,
                     script=script)
        _equal_results(a, b)


def test_sweeps_from_one_prefill_and_the_no_latent_control_are_bit_identical(tiny_subject, tmp_path):
    batch = tiny_subject.encode(make_instances(tmp_path, SIZES[:2]))
    clean = LatentDecoder(tiny_subject, DecodeConfig(max_new_tokens=10)).run(batch)
    stats = LatentStats.from_vectors(torch.cat([r.latent_vectors for r in clean.rows]))
    noise = LatentNoise(scale=3.0, steps=[1], semantics="recompute", seed=3)
    edits = [noise.bind(RowBinding(clean.rows[r // 3].instance_id, clean=clean.rows[r // 3].latent_vectors,
                                   stats=stats)) if r % 3 else None for r in range(2 * 3)]

    def sweep(decoder):
        prefill = decoder.prefill(batch)
        swept = decoder.decode(prefill, edits, repeats=3)
        again = decoder.decode(prefill)  # the prefill's cache was copied, not consumed
        without = decoder.decode(prefill_without_start(decoder, prefill))
        return swept, again, without

    results = _both(tiny_subject, DecodeConfig(max_new_tokens=10), sweep)
    assert results[0][0].rows[1].generated_ids != results[0][0].rows[0].generated_ids or \
        not torch.equal(results[0][0].rows[1].latent_vectors, results[0][0].rows[0].latent_vectors)
    _equal_results(results[0][1], clean)
    for x, y in zip(*results, strict=True):
        _equal_results(x, y)


def test_a_cache_that_outgrows_its_reserve_stays_bit_identical(tiny_subject, tmp_path, monkeypatch):
    batch = tiny_subject.encode(make_instances(tmp_path, SIZES[:3]))
    monkeypatch.setattr(LatentDecoder, "cache_reserve", lambda self: 1)
    a, b = _both(tiny_subject, DecodeConfig(max_new_tokens=20), lambda d: d.run(batch))
    _equal_results(a, b)


def test_text_backbone_is_bit_identical(tmp_path):
    from latentprobe.data import builtin_text_instances
    from latentprobe.model.subjects import load_subject

    from text_standins import build_text_standin

    folder = build_text_standin("coconut", tmp_path / "coconut", kind="gpt2")
    subject = load_subject("coconut", checkpoint=str(folder))
    batch = subject.encode(builtin_text_instances(3))
    a, b = _both(subject, DecodeConfig(max_new_tokens=16), lambda d: d.run(batch))
    _equal_results(a, b)


def _filled(reserve=3, batch=2, length=5):
    layer = PreallocatedLayer(reserve=reserve)
    keys = torch.arange(batch * 2 * length * 4, dtype=torch.float32).view(batch, 2, length, 4)
    layer.update(keys, -keys)
    return layer, keys


def test_layer_operations_touch_only_the_used_columns():
    layer, keys = _filled()
    assert layer.capacity == 8 and layer.get_seq_length() == 5
    layer.crop(-2)
    assert torch.equal(layer.keys, keys[:, :, :3]) and layer.get_seq_length() == 3
    layer.batch_repeat_interleave(3)
    assert torch.equal(layer.keys, keys[:, :, :3].repeat_interleave(3, dim=0))
    assert torch.equal(layer.values, -keys[:, :, :3].repeat_interleave(3, dim=0))
    layer.batch_select_indices(torch.tensor([5, 0]))
    assert torch.equal(layer.keys, keys[[1, 0], :, :3]) and layer.capacity == 8
    step = torch.full((2, 2, 1, 4), 7.0)
    out_keys, _ = layer.update(step, step)
    assert out_keys.shape == (2, 2, 4, 4) and torch.equal(out_keys[:, :, 3:], step)
    with pytest.raises(ValueError):
        layer.crop(1)


def test_deep_copies_are_independent_and_keep_room_to_write_in_place():
    layer, keys = _filled()
    twin = copy.deepcopy(layer)
    assert twin.capacity == layer.capacity
    assert twin._key_buffer.data_ptr() != layer._key_buffer.data_ptr()
    twin.update(torch.zeros(2, 2, 1, 4), torch.zeros(2, 2, 1, 4))
    twin.keys[:, :, 0] = 99.0
    assert torch.equal(layer.keys, keys) and layer.get_seq_length() == 5


def test_growth_doubles_and_keeps_the_written_columns():
    layer, keys = _filled(reserve=0, length=4)
    assert layer.capacity == 4
    layer.update(torch.ones(2, 2, 1, 4), torch.ones(2, 2, 1, 4))
    assert layer.capacity == 8 and torch.equal(layer.keys[:, :, :4], keys)


def _source(batch=2, length=5):
    cache = DynamicCache()
    keys = torch.randn(batch, 2, length, 4)
    cache.update(keys, -keys, 0)
    return cache, keys


@torch.no_grad()
def test_decode_cache_copies_selects_and_repeats_the_used_rows():
    source, keys = _source()
    for mode in ("preallocated", "dynamic"):
        repeated = decode_cache(source, repeats=3, reserve=4, mode=mode)
        assert torch.equal(repeated.layers[0].keys, keys.repeat_interleave(3, dim=0))
        picked = decode_cache(source, index=torch.tensor([1, 1, 0]), reserve=4, rows_room=5, mode=mode)
        assert torch.equal(picked.layers[0].values, -keys[[1, 1, 0]])
        append_rows(picked, [0, 2, 2])
        assert torch.equal(picked.layers[0].keys, keys[[1, 1, 0, 1, 0, 0]])
    layer = decode_cache(source, index=torch.tensor([1, 1, 0]), reserve=4, rows_room=5, mode="preallocated").layers[0]
    assert isinstance(layer, PreallocatedLayer)
    assert layer._key_buffer.shape[:3] == (5, 2, 9) and layer.rows == 3
    assert torch.equal(source.layers[0].keys, keys)  # the prefill's cache is left as it was


def test_decode_cache_is_dynamic_under_gradients():
    source, _ = _source()
    with torch.enable_grad():
        assert type(decode_cache(source, mode="preallocated")) is DynamicCache


def test_offload_moves_the_buffers_and_prefetch_brings_them_back():
    """transformers' offloading calls offload/prefetch on every layer: the buffers move, not only the views, so a
    later write lands where the views point."""
    layer = PreallocatedLayer(reserve=4)
    before = torch.arange(24.0).view(1, 2, 3, 4)
    layer.update(before.clone(), -before)
    layer.offload()
    layer.prefetch()
    assert layer.keys.data_ptr() == layer._key_buffer.data_ptr()
    keys, values = layer.update(torch.ones(1, 2, 1, 4), torch.ones(1, 2, 1, 4))
    assert torch.equal(keys[:, :, :3], before) and torch.equal(values[:, :, :3], -before)
    assert torch.equal(keys[:, :, 3], torch.ones(1, 2, 4)) and layer.capacity == 7
    # prefetch goes to the layer's own device (an accelerator's, in real use; the meta device stands in here)
    layer.device = torch.device("meta")
    layer.prefetch()
    assert layer._key_buffer.device.type == "meta" and layer.keys.device.type == "meta"
    assert layer.values.shape == (1, 2, 4, 4)
