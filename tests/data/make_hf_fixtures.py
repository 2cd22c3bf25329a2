#!/usr/bin/env python3
"""Tiny random Mamba checkpoints and reference outputs from HF transformers, for tests/test_checkpoint.cpp.

Writes, next to this script:
  tiny-mamba-hf/          transformers layout, tied embeddings, vocab 104 (already padded, as state-spaces/*-hf),
                          one model.safetensors
  tiny-mamba-hf-sharded/  transformers layout, untied lm_head, vocab 100 (no multiple of 8), other sizes
                          (d_conv 3, explicit time_step_rank, in/out_proj biases, no conv bias), saved in
                          several model-0000i-of-0000n.safetensors shards + model.safetensors.index.json
  tiny-mamba-ssm/         mamba_ssm layout: tiny-mamba-hf's weights under mamba_ssm's names
                          (backbone.embedding.weight, lm_head.weight sharing it, as mamba_ssm's state_dict()),
                          torch.save'd to pytorch_model.bin, and mamba_ssm's config.json (vocab_size 100,
                          pad_vocab_size_multiple 8 -> the same 104 rows). Its references are tiny-mamba-hf's.
Each HF directory gets reference.safetensors and reference.json from transformers' MambaForCausalLM
(CPU, float32, the slow reference path):
  input_ids [2, L]; logits [2, L, vocab]; conv_state.{i} [2, d_inner, d_conv-1] (HF keeps d_conv columns,
  the newest last; the oldest is dropped to match statemamba's state); ssm_state.{i} [2, d_inner, d_state];
  reference.json: the greedy continuation ids (HF's cached decode, cross-checked against full recomputation).

Run (transformers, tokenizers and safetensors installed beside the project venv's torch):
  PYTHONPATH=~/.cache/statemamba/hf-site ~/.cache/statemamba/venv-torch-2.11.0/bin/python tests/data/make_hf_fixtures.py
Check that transformers loads what statemamba's save_pretrained wrote and computes the fixtures'
reference logits with it:
  STATEMAMBA_KEEP_SAVED=DIR build/tests/test_checkpoint --gtest_filter=*KeepSaved*
  ... make_hf_fixtures.py --check-saved DIR      (DIR/tiny-mamba-hf, DIR/tiny-mamba-hf-sharded)
"""
import argparse
import collections
import json
import os
import shutil
import sys

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import MambaConfig, MambaForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPT = [[3, 17, 42, 99, 5, 64, 23, 8, 71], [60, 2, 2, 31, 90, 14, 77, 50, 1]]
NEW_TOKENS = 8
MIN_GREEDY_MARGIN = 1e-2  # top-1 minus top-2 logit at every greedy step, so float noise cannot flip a choice
MIN_DISTINCT_TOKENS = 5   # per continuation: a decode stuck on one token would test little


def perturb(model, seed):
    """Every parameter gets noise, so a tensor loaded into the wrong place cannot go unnoticed
    (norm weights, A_log, D and biases otherwise start at constants)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # 0.3 on the matrices: random models this small otherwise decode one token over and over.
            scale = 0.5 if name.endswith(("norm.weight", "norm_f.weight", ".D", "conv1d.bias", "in_proj.bias")) else 0.3
            p.add_(scale * torch.randn(p.shape, generator=g))


@torch.no_grad()
def run_reference(model, ids):
    out = model(ids, use_cache=True)
    cache = out.cache_params
    n_layer = model.config.num_hidden_layers
    tensors = {"input_ids": ids.clone(), "logits": out.logits.float().contiguous()}
    for i in range(n_layer):
        conv = cache.get_conv_state(i, state_idx=0)
        assert conv.shape[-1] == model.config.conv_kernel, conv.shape
        # Copies: the decode below updates the cache in place.
        tensors[f"conv_state.{i}"] = conv[..., 1:].float().clone()  # drop the oldest column
        tensors[f"ssm_state.{i}"] = cache.get_recurrent_state(i, state_idx=0).float().clone()

    # Greedy decode through HF's cache (its one-token path) ...
    generated, margins = [], []
    logits = out.logits[:, -1]
    for _ in range(NEW_TOKENS):
        top2 = logits.topk(2, dim=-1).values
        margins.append((top2[:, 0] - top2[:, 1]).min().item())
        nxt = logits.argmax(-1)
        generated.append(nxt)
        logits = model(nxt[:, None], cache_params=cache, use_cache=True).logits[:, -1]
    greedy = torch.stack(generated, 1)
    # ... which must match recomputing the whole sequence at each step.
    seq = ids
    for _ in range(NEW_TOKENS):
        seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(seq[:, ids.shape[1]:], greedy), "HF cached and uncached greedy decoding differ"
    return tensors, greedy, min(margins)


def write_reference(directory, reference, seed):
    tensors, greedy, margin = reference
    save_file(tensors, os.path.join(directory, "reference.safetensors"))
    fields = {"generator": "tests/data/make_hf_fixtures.py", "transformers": transformers.__version__,
              "torch": torch.__version__, "seed": seed, "input_ids": PROMPT, "new_tokens": NEW_TOKENS,
              "greedy_ids": greedy.tolist(), "min_greedy_margin": margin}
    with open(os.path.join(directory, "reference.json"), "w") as f:
        f.write("{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in fields.items()) + "\n}\n")


def drop_generation_config(directory):
    # save_pretrained writes it; nothing here reads it.
    path = os.path.join(directory, "generation_config.json")
    if os.path.exists(path):
        os.remove(path)


def fresh_dir(name):
    path = os.path.join(HERE, name)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


def make_model(config, first_seed):
    """The first seed from first_seed on whose greedy decode is clear-cut and varied: returns
    (model, seed, reference)."""
    for seed in range(first_seed, first_seed + 50):
        torch.manual_seed(seed)
        model = MambaForCausalLM(config).eval()
        perturb(model, seed + 1000)
        reference = run_reference(model, torch.tensor(PROMPT, dtype=torch.long))
        _, greedy, margin = reference
        if margin >= MIN_GREEDY_MARGIN and all(len(set(row)) >= MIN_DISTINCT_TOKENS for row in greedy.tolist()):
            return model, seed, reference
    raise RuntimeError("no seed gave a clear-cut, varied greedy decode")


def make_all():
    # 1. HF layout, tied, vocab already padded to a multiple of 8.
    tied_cfg = MambaConfig(vocab_size=104, hidden_size=32, state_size=8, num_hidden_layers=2, conv_kernel=4, expand=2,
                           tie_word_embeddings=True)
    tied, seed, reference = make_model(tied_cfg, 1)
    d = fresh_dir("tiny-mamba-hf")
    tied.save_pretrained(d)
    drop_generation_config(d)
    write_reference(d, reference, seed)

    # 2. The same weights in mamba_ssm's layout.
    d_ssm = fresh_dir("tiny-mamba-ssm")
    sd = collections.OrderedDict()
    for name, t in tied.state_dict().items():
        sd[name.replace("backbone.embeddings.", "backbone.embedding.")] = t
    # mamba_ssm's state_dict() lists the tied head as a second name for the embedding.
    sd["lm_head.weight"] = sd["backbone.embedding.weight"]
    # ... and carries _metadata (pickled as a BUILD on the dict), as every state_dict() does.
    sd._metadata = collections.OrderedDict((k.replace("embeddings", "embedding"), v) for k, v in tied.state_dict()._metadata.items())
    torch.save(sd, os.path.join(d_ssm, "pytorch_model.bin"))
    with open(os.path.join(d_ssm, "config.json"), "w") as f:
        json.dump({"d_model": 32, "d_intermediate": 0, "n_layer": 2, "vocab_size": 100,
                   "ssm_cfg": {"layer": "Mamba1", "d_state": 8}, "attn_layer_idx": [], "attn_cfg": {},
                   "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
                   "pad_vocab_size_multiple": 8, "tie_embeddings": True}, f, indent=1)
        f.write("\n")

    # 3. HF layout, untied, unpadded vocab, other sizes, sharded.
    untied_cfg = MambaConfig(vocab_size=100, hidden_size=24, state_size=4, num_hidden_layers=3, conv_kernel=3,
                             expand=2, time_step_rank=3, use_bias=True, use_conv_bias=False,
                             layer_norm_epsilon=1e-6, tie_word_embeddings=False)
    untied, seed, reference = make_model(untied_cfg, 100)
    assert not torch.equal(untied.lm_head.weight, untied.backbone.embeddings.weight)
    d = fresh_dir("tiny-mamba-hf-sharded")
    untied.save_pretrained(d, max_shard_size="30KB")
    drop_generation_config(d)
    shards = [f for f in os.listdir(d) if f.startswith("model-") and f.endswith(".safetensors")]
    assert len(shards) >= 2 and os.path.exists(os.path.join(d, "model.safetensors.index.json")), os.listdir(d)
    write_reference(d, reference, seed)

    # Loading back through transformers gives the same model (the files are what we think they are).
    for name, model in [("tiny-mamba-hf", tied), ("tiny-mamba-hf-sharded", untied)]:
        again = MambaForCausalLM.from_pretrained(os.path.join(HERE, name)).eval()
        ref = load_file(os.path.join(HERE, name, "reference.safetensors"))
        with torch.no_grad():
            assert torch.equal(again(ref["input_ids"]).logits, ref["logits"]), name

    total = sum(os.path.getsize(os.path.join(r, f)) for n in ("tiny-mamba-hf", "tiny-mamba-hf-sharded", "tiny-mamba-ssm")
                for r, _, fs in os.walk(os.path.join(HERE, n)) for f in fs)
    print(f"fixtures written, {total} bytes in all")
    assert total < 1_000_000


def check_saved(root, tolerance):
    """transformers loads what statemamba's save_pretrained wrote and computes the reference logits."""
    checked = 0
    for name in ("tiny-mamba-hf", "tiny-mamba-hf-sharded"):
        saved = os.path.join(root, name)
        if not os.path.isdir(saved):
            continue
        model = MambaForCausalLM.from_pretrained(saved).eval()
        ref = load_file(os.path.join(HERE, name, "reference.safetensors"))
        with torch.no_grad():
            logits = model(ref["input_ids"]).logits
        diff = (logits - ref["logits"]).abs().max().item()
        print(f"transformers loaded {saved}: max |logits - reference| = {diff:.3g}")
        if diff > tolerance:
            sys.exit(f"FAILED: difference {diff} > {tolerance}")
        checked += 1
    if checked == 0:
        sys.exit(f"FAILED: {root} holds neither tiny-mamba-hf nor tiny-mamba-hf-sharded")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check-saved", metavar="DIR", help="load DIR/<fixture> with transformers, compare to references")
    parser.add_argument("--tolerance", type=float, default=1e-5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.check_saved:
        check_saved(args.check_saved, args.tolerance)
    else:
        make_all()


if __name__ == "__main__":
    main()
