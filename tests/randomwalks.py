"""The randomwalks task (Decision Transformer, Chen et al. 2021; trlx's offline-RL check): ILQL's test task
(``tests/test_ilql.py``, ``benchmarks/ilql.py``).

A random directed graph; node 0 is the goal (absorbing). The offline data are random walks from random
start nodes; a walk's reward is its optimality in [0, 1]: (L_max - L) / (L_max - L_shortest), where L counts
the nodes of the walk up to the goal, and a walk that breaks an edge or never reaches the goal counts as L_max.
A policy that learned from the walks' rewards (not just imitated them) finds the shortest paths.
Nodes are the letters a, b, c ... written space-separated, so any word-level tokenizer reads them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from stackrlhf.models.offline_base import EOS, PAD
from stackrlhf.rl.ilql import ScoredSample

GOAL = 0


def node_name(i: int) -> str:
    return chr(ord("a") + i)


@dataclass
class RandomWalks:
    adjacency: np.ndarray  # [n, n] bool, adjacency[i, j]: an edge i -> j
    walks: list[list[int]]
    max_length: int

    @property
    def n_nodes(self) -> int:
        return len(self.adjacency)

    def shortest(self, start: int) -> int:
        """Nodes on the shortest path from ``start`` to the goal, both counted (``max_length`` if unreachable)."""
        depth = {start: 1}
        queue = deque([start])
        while queue:
            node = queue.popleft()
            if node == GOAL:
                return depth[node]
            for nxt in np.nonzero(self.adjacency[node])[0]:
                if int(nxt) not in depth:
                    depth[int(nxt)] = depth[node] + 1
                    queue.append(int(nxt))
        return self.max_length

    def optimality(self, walk: list[int]) -> float:
        best = self.shortest(walk[0])
        if best >= self.max_length:
            return 0.0
        length = self.max_length
        for i, node in enumerate(walk):
            if node < 0 or node >= self.n_nodes or (i > 0 and not self.adjacency[walk[i - 1], node]):
                break
            if node == GOAL:
                length = i + 1
                break
        return max(self.max_length - length, 0) / (self.max_length - best)

    def starts(self) -> list[int]:
        """Start nodes from which the goal can be reached (the evaluation prompts)."""
        return [s for s in range(self.n_nodes) if s != GOAL and self.shortest(s) < self.max_length]

    def behaviour_optimality(self) -> float:
        return float(np.mean([self.optimality(w) for w in self.walks]))

    # ------------------------------------------------------------ text

    def parse(self, start: int, text: str) -> list[int]:
        index = {node_name(i): i for i in range(self.n_nodes)}
        return [start] + [index.get(t, -1) for t in text.split()]

    def prompt(self, start: int) -> str:
        return node_name(start)

    def samples(self, tok: PreTrainedTokenizerFast) -> list[ScoredSample]:
        """Each walk as an offline episode: the start node as the prompt, the rest (+ EOS) as the answer."""
        out = []
        for walk in self.walks:
            prompt = tok(node_name(walk[0]), add_special_tokens=False)["input_ids"]
            rest = tok(" ".join(node_name(n) for n in walk[1:]), add_special_tokens=False)["input_ids"]
            out.append(ScoredSample(prompt, rest + [tok.eos_token_id], self.optimality(walk)))
        return out


def generate_random_walks(n_nodes: int = 21, max_length: int = 10, n_walks: int = 1000, p_edge: float = 0.1,
                          seed: int = 1002) -> RandomWalks:
    rng = np.random.RandomState(seed)
    while True:  # every node needs a way out
        adjacency = rng.rand(n_nodes, n_nodes) > (1 - p_edge)
        np.fill_diagonal(adjacency, False)
        if adjacency.sum(1).all():
            break
    adjacency[GOAL, :] = False
    adjacency[GOAL, GOAL] = True
    walks = []
    for _ in range(n_walks):
        node = int(rng.randint(1, n_nodes))
        walk = [node]
        for _ in range(max_length - 1):
            node = int(rng.choice(np.nonzero(adjacency[node])[0]))
            walk.append(node)
            if node == GOAL:
                break
        walks.append(walk)
    return RandomWalks(adjacency, walks, max_length)


def walk_tokenizer(n_nodes: int) -> PreTrainedTokenizerFast:
    vocab = {EOS: 0, PAD: 1} | {node_name(i): i + 2 for i in range(n_nodes)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD, unk_token=PAD)
    fast.padding_side = "left"
    return fast


def walk_model(tok: PreTrainedTokenizerFast, layers: int = 2, width: int = 96, seed: int = 0) -> GPT2LMHeadModel:
    import torch

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=width, n_layer=layers, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tok.eos_token_id,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    return GPT2LMHeadModel(config)


def evaluate(task: RandomWalks, model, tok, beta: float, samples_per_start: int = 1, temperature: float = 0.0,
             top_k: int = 0, seed: int = 0) -> float:
    """Mean optimality of the walks the (ILQL) model decodes from every reachable start node."""
    from stackrlhf.models.generation import SamplingConfig
    from stackrlhf.models.ilql import ilql_generate

    starts = [s for s in task.starts() for _ in range(samples_per_start)]
    sampling = SamplingConfig(max_new_tokens=task.max_length, temperature=temperature, top_k=top_k, top_p=1.0)
    gen = ilql_generate(model, tok, [task.prompt(s) for s in starts], sampling, beta=beta, batch_size=256, seed=seed)
    return float(np.mean([task.optimality(task.parse(s, t)) for s, t in zip(starts, gen.texts)]))
