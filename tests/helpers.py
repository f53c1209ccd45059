"""What several test modules use: the repository's paths, the shared dumps, a tiny LM, a real annotation server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STACKRLHF_TEST_SHARED", REPO.parent / "shared" / "data" / "stackexchange"))
TINY_DUMP = REPO / "tests" / "data" / "tea.example.com"  # a made-up dump (CC0): tests that need any dump, not ../shared
SITES = ("beer.stackexchange.com", "cardano.stackexchange.com", "quantumcomputing.stackexchange.com",
         "matheducators.stackexchange.com")

DUMPS_MISSING = (None if all((SHARED / site / "Posts.xml").is_file() for site in SITES) else
                 f"the shared Stack Exchange dumps are not in {SHARED}: clone this repository beside ../shared")
_SITE_DUMP: list[Path] = []


def site_dump() -> Path:
    """A site-sized dump: beer from ../shared, or without it a synthetic site of the same size (written once per
    process into a temporary folder named ``synthetic.example.com``)."""
    if DUMPS_MISSING is None:
        return SHARED / SITES[0]
    if not _SITE_DUMP:
        import tempfile

        from synthdump import write_synthetic_dump

        _SITE_DUMP.append(write_synthetic_dump(Path(tempfile.mkdtemp(prefix="stackrlhf-site-")) /
                                               "synthetic.example.com"))
    return _SITE_DUMP[0]


def read_parquet_rows(root: Path, dataset: str, split: str) -> list[dict]:
    import pyarrow.parquet as pq

    shards = sorted((root / dataset).glob(f"{split}-*.parquet"))
    assert shards, f"no {dataset}/{split} shards in {root}"
    return [row for shard in shards for row in pq.read_table(shard).to_pylist()]


def save_tiny_lm(texts: list[str], out: Path) -> Path:
    """A randomly initialised 2-layer GPT-2 with a 400-token BPE vocabulary learned from ``texts``, saved."""
    import torch

    from stackrlhf.models.offline_base import make_model, train_tokenizer

    tok = train_tokenizer(texts, vocab_size=400)
    torch.manual_seed(0)
    model = make_model("tiny", tok)
    model.transformer.h = model.transformer.h[:2]
    model.config.n_layer = 2
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


# ---------------------------------------------------------------- a real annotation server

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(db: str, port: int, *options: str) -> subprocess.Popen:
    """`stackrlhf feedback serve` in a process of its own, with ``options`` added; returns once it answers."""
    proc = subprocess.Popen([sys.executable, "-m", "stackrlhf", "feedback", "serve", "--db", db, "--port", str(port),
                             *options],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for _ in range(200):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"the server did not start: {proc.stderr.read().decode()[-2000:]}")


# ---------------------------------------------------------------- a tiny chat model, and the same as a GGUF file

CHATML_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                   "{{ '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n' }}{% endif %}"
                   "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
                   "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CHAT_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_chat_llama(texts: list[str], vocab_size: int = 300, seed: int = 0):
    """A randomly initialised 2-layer Llama (grouped-query attention, tied head) with a byte-level BPE vocabulary
    learned from ``texts`` and a ChatML chat template, in the shape of SmolLM2-Instruct: (model, tokenizer)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=CHAT_SPECIALS,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|im_end|>", unk_token="<|endoftext|>")
    tok.chat_template = CHATML_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1, so a mix-up of norm weights shows in the logits
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model, tok


def write_llama_gguf(model, tok, path: Path) -> Path:
    """``model`` and ``tok`` as a float32 GGUF file, written the way llama.cpp's converter writes a Llama: the
    query and key rows permuted into its rotary layout, the head left out when tied, the BPE vocabulary with its
    merges, control tokens and chat template."""
    import json

    import gguf
    import numpy as np

    cfg = model.config
    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = set(tok.all_special_tokens)
    merges = [" ".join(m) if isinstance(m, (list, tuple)) else m
              for m in json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]]

    def permute(w: np.ndarray, heads: int) -> np.ndarray:
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tok.bos_token_id)
    writer.add_eos_token_id(tok.eos_token_id)
    writer.add_pad_token_id(tok.pad_token_id)
    writer.add_chat_template(tok.chat_template)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        writer.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.attn_q.weight", permute(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads))
        writer.add_tensor(f"blk.{i}.attn_k.weight", permute(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads))
        writer.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        writer.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def randomised_q_heads(model, std: float = 0.02):
    """An ILQL model whose Q heads' (and their targets') output layers are random, as a trained model's are:
    a fresh model's start at zero and shift no token against another."""
    import torch

    with torch.no_grad():
        for heads in (model.heads.q_heads, model.heads.target_q_heads):
            for head in heads:
                head.out.weight.normal_(0.0, std)
                head.out.bias.normal_(0.0, std)
    return model
