"""llmcore's Llama 3.2 / Qwen3 / Gemma 3 against transformers: logits, greedy KV-cache decoding,
loading (single file, shards, bf16), conversion to llmcore checkpoints, and one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from llmcore.checkpoint import CheckpointError, load_checkpoint
from llmcore.decoder import DecoderModel
from llmcore.generate import generate
from llmcore.hf_checkpoint import convert_hf, load_hf_model
from llmcore.slot_cache import SlotKVCache
from tests.bases_helpers import VOCAB, hf_model, save_hf

pytest.importorskip("transformers")
FAMILIES = ("llama", "qwen3", "gemma3")


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    """(family, transformers model, llmcore model loaded from its save_pretrained directory)."""
    family = request.param
    hf = hf_model(family)
    directory = save_hf(hf, tmp_path_factory.mktemp(family) / "hf")
    return family, hf, load_hf_model(directory).eval()


def _ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_logits_equal_transformers(pair):
    family, hf, ours = pair
    ids = _ids(2, 21)  # longer than Gemma's sliding window (4) and Llama's original context (16)
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert got.shape == expected.shape == (2, 21, VOCAB)
    assert (got - expected).abs().max().item() <= 1e-5, family


def test_greedy_kv_cache_generation_equals_transformers_generate(pair):
    family, hf, ours = pair
    ids = _ids(2, 7, seed=2)
    expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    got = generate(ours, ids, 12)
    assert got == expected[:, 7:].tolist(), family


def test_left_padded_batch_decodes_each_prompt_as_alone(pair):
    family, hf, ours = pair
    short, long = _ids(1, 3, seed=3)[0].tolist(), _ids(1, 9, seed=4)[0].tolist()
    batch = generate(ours, [short, long], 10)
    alone = [generate(ours, [short], 10)[0], generate(ours, [long], 10)[0]]
    assert batch == alone
    expected = hf.generate(
        torch.tensor([long]), attention_mask=torch.ones(1, 9, dtype=torch.long), max_new_tokens=10, do_sample=False
    )
    assert alone[1] == expected[0, 9:].tolist(), family


def test_slot_cache_decodes_as_generate(pair):
    family, _, ours = pair
    prompts = [_ids(1, 5, seed=5)[0].tolist(), _ids(1, 2, seed=6)[0].tolist()]
    cache = SlotKVCache(ours, slots=2, max_len=32)
    last = torch.stack([cache.prefill(ours, row, p) for row, p in enumerate(prompts)]).argmax(-1)
    lengths = torch.tensor([len(p) for p in prompts])
    out = [[int(t)] for t in last]
    for _ in range(7):
        last = cache.decode(ours, last, lengths).argmax(-1)
        lengths += 1
        for row, token in enumerate(last.tolist()):
            out[row].append(token)
    assert out == [generate(ours, [p], 8)[0] for p in prompts], family


@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_and_bf16_checkpoints_load(family, tmp_path):
    import transformers as tf

    hf = hf_model(family, seed=3)
    sharded = save_hf(hf, tmp_path / "sharded", shard=True)
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("model-*.safetensors"))) > 1
    ids = _ids(1, 11)
    with torch.no_grad():
        assert (load_hf_model(sharded)(ids) - hf(ids).logits).abs().max().item() <= 1e-5
    bf16 = save_hf(hf, tmp_path / "bf16", dtype=torch.bfloat16)
    reference = tf.AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.float32).eval()
    ours = load_hf_model(bf16)
    assert ours.tok_emb.weight.dtype == torch.float32
    with torch.no_grad():
        assert (ours(ids) - reference(ids).logits).abs().max().item() <= 1e-5
    native = load_hf_model(bf16, dtype=torch.bfloat16)
    assert native.tok_emb.weight.dtype == torch.bfloat16 and torch.equal(
        native.tok_emb.weight.float(), ours.tok_emb.weight
    )


def test_convert_to_llmcore_checkpoint_round_trips(pair, tmp_path):
    family, hf, ours = pair
    source = save_hf(hf, tmp_path / "hf")
    (source / "tokenizer_config.json").write_text("{}")
    target = convert_hf(source, tmp_path / "llmcore")
    meta = json.loads((target / "config.json").read_text())
    assert meta["format"] == "llmcore-decoder" and meta["config"]["family"] == family
    assert (target / "tokenizer_config.json").is_file()
    loaded = load_checkpoint(target).eval()
    assert isinstance(loaded, DecoderModel)
    ids = _ids(1, 9)
    with torch.no_grad():
        assert torch.equal(loaded(ids), ours(ids))
    if ours.cfg.tie_embeddings:
        assert loaded.out_head.weight is loaded.tok_emb.weight


def test_unknown_architecture_is_one_line_error(tmp_path):
    directory = save_hf(hf_model("qwen3"), tmp_path / "m")
    config = json.loads((directory / "config.json").read_text())
    config["architectures"], config["model_type"] = ["MistralForCausalLM"], "mistral"
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"architecture \['MistralForCausalLM'\] is not supported") as err:
        load_hf_model(directory)
    assert "\n" not in str(err.value) and "config.json" in str(err.value)


def test_mismatched_shape_names_the_tensor(tmp_path):
    directory = save_hf(hf_model("llama"), tmp_path / "m")
    config = json.loads((directory / "config.json").read_text())
    config["intermediate_size"] = 40
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError, match=r"tensor model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight has shape"
    ) as err:
        load_hf_model(directory)
    assert "\n" not in str(err.value)


def test_missing_and_untied_head_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    directory = save_hf(hf_model("llama"), tmp_path / "m")  # untied: lm_head.weight is required
    state = load_file(directory / "model.safetensors")
    del state["lm_head.weight"]
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing tensor out_head.weight"):
        load_hf_model(directory)


def test_missing_directory_and_weights(tmp_path):
    from llmcore.hf_checkpoint import BaseUnavailableError

    with pytest.raises(BaseUnavailableError, match="no such directory"):
        load_hf_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(hf_model("qwen3").config.to_dict()))
    with pytest.raises(CheckpointError, match="neither model.safetensors nor"):
        load_hf_model(tmp_path / "empty")


def test_lora_trains_adapters_and_merged_weights_equal_unmerged(pair):
    import copy

    from llmcore.lora import apply_lora, merge_lora

    family, _, ours = pair
    model = copy.deepcopy(ours).train()
    names = apply_lora(model, rank=4, alpha=8.0)
    assert {n.rsplit(".", 1)[-1] for n in names} == {"q_proj", "k_proj", "v_proj", "out_proj", "gate", "up", "down"}
    ids = _ids(2, 10, seed=7)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model.loss(ids[:, :-1], ids[:, 1:]).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        unmerged = model(ids)
        assert (unmerged - ours(ids)).abs().max().item() > 1e-4  # the adapters learned something
        merge_lora(model)
        assert (model(ids) - unmerged).abs().max().item() <= 1e-5, family
    assert torch.equal(model.tok_emb.weight, ours.tok_emb.weight)  # only adapted Linears changed
