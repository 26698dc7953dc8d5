"""``seedbed compose cbtm``: cluster a corpus, train one expert per cluster, pack their mixture.

The steps, each resumable by hand from its output in the compose folder:

1. the shared tokenizer (a SentencePiece model trained on the whole corpus's train split is
   written to ``tokenizer.model``; bytes need nothing);
2. ``clusters.json`` (which cluster every chunk of every split went to, ``data/clusters.py``)
   and ``clusters.tsv`` (the same, one readable line per chunk);
3. the experts, ``expert-I/``: ordinary run folders trained on ``cluster:I:clusters.json``,
   several at a time in their own processes (or run folders the user trained anywhere);
4. ``cbtm.seedbed``: the experts and the router in one artifact.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import sys
from pathlib import Path

import numpy as np
import scipy.sparse as sparse
import torch
from tqdm import tqdm

from seedbed.compose.cbtm import CBTM, Router
from seedbed.compose.cluster import balanced_kmeans, count_matrix, embed, nearest, smooth_idf
from seedbed.compose.fit import Fit, train_steps
from seedbed.config import RunConfig, config_from_dict
from seedbed.data import load_splits, make_tokenizer
from seedbed.data.clusters import chunk_documents, read_clusters, write_clusters
from seedbed.data.corpus import SPLIT_NAMES
from seedbed.errors import UserError
from seedbed.fileio import atomic_write_text
from seedbed.loaded import LoadedModel

CLUSTERS_FILE = "clusters.json"


def shared_tokenizer(cfg: RunConfig, out: Path) -> str:
    """The tokenizer spec every expert uses: ``sp`` becomes one model trained on the whole corpus."""
    if cfg.data.tokenizer != "sp":
        return cfg.data.tokenizer
    tokenizer = make_tokenizer("sp", load_splits(cfg.data.spec)[0], cfg.data.vocab_size)
    path = (out / "tokenizer.model").resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tokenizer.model_proto)
    return f"sp:{path}"


def features_of(chunks, tokenizer) -> sparse.csr_matrix:
    return count_matrix([tokenizer.encode(chunk.data) for chunk in chunks], tokenizer.vocab_size)


def cluster_corpus(spec: str, tokenizer_spec: str, vocab_size: int, clusters: int, chunk_bytes: int,
                   path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Cluster ``spec``'s train chunks (balanced), send held-out chunks to their nearest centre,
    write the clusters file and its readable listing; returns the assignment per split."""
    splits = load_splits(spec)
    tokenizer = make_tokenizer(tokenizer_spec, splits[0], vocab_size)
    chunked = [chunk_documents(split, chunk_bytes) for split in splits]
    if len(chunked[0]) < clusters:
        raise UserError(f"{spec} has {len(chunked[0])} training chunks of {chunk_bytes} bytes, fewer than "
                        f"{clusters} clusters; use fewer clusters or smaller chunks")
    counts = features_of(chunked[0], tokenizer)
    idf = smooth_idf(counts)
    centres, train_assignment = balanced_kmeans(embed(counts, idf), clusters, seed)
    assignment = {"train": train_assignment}
    for name, chunks in zip(SPLIT_NAMES[1:], chunked[1:], strict=True):
        assignment[name] = nearest(embed(features_of(chunks, tokenizer), idf), centres)
    for cluster in range(clusters):
        for name in SPLIT_NAMES:
            if not (assignment[name] == cluster).any():
                raise UserError(f"cluster {cluster} of {spec} got no {name} chunks; use fewer clusters")
    write_clusters(path, spec, clusters, chunk_bytes, tokenizer_spec, assignment, chunked)
    listing = ["split\tcluster\tbytes\tchunk"] + [
        f"{name}\t{cluster}\t{len(chunk.data)}\t{chunk.name}"
        for name, chunks in zip(SPLIT_NAMES, chunked, strict=True)
        for chunk, cluster in zip(chunks, assignment[name], strict=True)]
    atomic_write_text(path.with_suffix(".tsv"), "\n".join(listing) + "\n")
    return assignment


def router_from_clusters(path: Path, vocab: int, top_k: int, temperature: float) -> Router:
    """The router of a clusters file: the train chunks' idf, and each cluster's centre as the mean
    embedding of its chunks (where balanced k-means stopped)."""
    fields = read_clusters(path)
    splits = load_splits(fields["spec"])
    tokenizer = make_tokenizer(fields["tokenizer"], splits[0], 0)
    if tokenizer.vocab_size != vocab:
        raise UserError(f"{path} was clustered with a vocabulary of {tokenizer.vocab_size}, the experts have {vocab}")
    chunks = chunk_documents(splits[0], fields["chunk_bytes"])
    assignment = np.array(fields["splits"]["train"])
    if len(chunks) != len(assignment):
        raise UserError(f"corpus {fields['spec']!r} has changed since {path} was written; cluster it again")
    counts = features_of(chunks, tokenizer)
    idf = smooth_idf(counts)
    embedded = embed(counts, idf)
    centres = np.stack([np.asarray(embedded[assignment == k].mean(0)).ravel() for k in range(fields["clusters"])])
    return Router(torch.from_numpy(idf), torch.from_numpy(centres), vocab, top_k, temperature)


def with_data(config: RunConfig, **data) -> RunConfig:
    """``config`` with its ``[data]`` keys replaced by ``data``: a composed model's config names the
    corpus it was composed for; an expert's, its cluster."""
    values = config.to_dict()
    return config_from_dict({**values, "data": {**values["data"], **data}})


def expert_config(base: RunConfig, clusters_path: Path, index: int, tokenizer_spec: str) -> RunConfig:
    return with_data(base, spec=f"cluster:{index}:{clusters_path.resolve()}", tokenizer=tokenizer_spec)


def _train_expert(cfg: RunConfig, run_dir: Path, threads: int) -> float:
    from seedbed.train.trainer import Trainer

    torch.set_num_threads(threads)
    cfg.train.threads = threads
    return Trainer(cfg, run_dir, progress=False).run().val_bpb


def train_experts(configs: list[RunConfig], out: Path, parallel: int) -> list[Path]:
    """Train each config into ``out/expert-I``, ``parallel`` at a time in spawned processes, the
    machine's cores shared between them; one progress bar over the experts."""
    run_dirs = [out / f"expert-{index}" for index in range(len(configs))]
    threads = max(1, (os.cpu_count() or 1) // parallel)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(parallel, mp_context=context) as pool, \
            tqdm(total=len(configs), desc="experts", unit="expert", file=sys.stderr) as bar:
        futures = {pool.submit(_train_expert, cfg, run_dir, threads): index
                   for index, (cfg, run_dir) in enumerate(zip(configs, run_dirs, strict=True))}
        for future in concurrent.futures.as_completed(futures):
            bar.update(1)
            bar.set_postfix_str(f"expert {futures[future]}: val bpb {future.result():.4f}")
    return run_dirs


def cbtm_from_runs(experts: list[LoadedModel], clusters_path: Path, top_k: int, temperature: float) -> LoadedModel:
    """One loaded c-BTM model from trained experts (one per cluster, in cluster order)."""
    protos = {expert.tokenizer.model_proto for expert in experts}
    if len(protos) != 1:
        raise UserError("the experts were trained with different tokenizers; c-BTM mixes one vocabulary")
    fields = read_clusters(clusters_path)
    if len(experts) != fields["clusters"]:
        raise UserError(f"{clusters_path} has {fields['clusters']} clusters, got {len(experts)} experts")
    if not 1 <= top_k <= len(experts):
        raise UserError(f"--top-k must be in 1..{len(experts)}, got {top_k}")
    router = router_from_clusters(clusters_path, experts[0].model.cfg.vocab_size, top_k, temperature)
    model = CBTM([expert.model for expert in experts], router).eval()
    first = experts[0]
    return LoadedModel(model, with_data(first.config, spec=fields["spec"]), first.tokenizer, clusters_path.parent)


def base_tokenizer(base: LoadedModel, out: Path) -> str:
    """The tokenizer spec of a base model's tokenizer, written to ``out/tokenizer.model`` if SentencePiece."""
    if base.tokenizer.model_proto is None:
        return "bytes"
    path = (out / "tokenizer.model").resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base.tokenizer.model_proto)
    return f"sp:{path}"


def _train_phatgoose_module(base_path: Path, spec: str, tokenizer_spec: str, rank: int, budget: dict, gate_budget: dict,
                            batch_size: int, lr: float, seed: int, path: Path, threads: int) -> dict:
    from seedbed.compose.phatgoose import PhatGoose, train_module
    from seedbed.data import load_dataset
    from seedbed.runs import load
    from seedbed.train.checkpoint import save_checkpoint

    torch.set_num_threads(threads)
    base = load(base_path)
    tokens = torch.from_numpy(np.asarray(load_dataset(spec, tokenizer_spec).train.tokens, np.int64))
    model = PhatGoose(base.model, 1, rank)
    stats = train_module(model, tokens, batch_size, lr, seed, budget, gate_budget)
    save_checkpoint(path, model.module_tensors(0), {"data": spec, "rank": rank, **stats})
    return stats


def train_phatgoose_modules(base_path: Path, specs: list[str], tokenizer_spec: str, rank: int, budget: dict,
                            gate_budget: dict, batch_size: int, lr: float, out: Path, parallel: int) -> list[Path]:
    """Module I (its LoRA for ``budget``, then its gate for ``gate_budget``: ``steps=N`` or
    ``seconds=S``) trained on ``specs[I]`` into ``out/module-I.safetensors``, ``parallel`` at a
    time in spawned processes; one progress bar over the modules."""
    paths = [out / f"module-{index}.safetensors" for index in range(len(specs))]
    threads = max(1, (os.cpu_count() or 1) // parallel)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(parallel, mp_context=context) as pool, \
            tqdm(total=len(specs), desc="modules", unit="module", file=sys.stderr) as bar:
        futures = {pool.submit(_train_phatgoose_module, base_path, spec, tokenizer_spec, rank, budget, gate_budget,
                               batch_size, lr, index, path, threads): index
                   for index, (spec, path) in enumerate(zip(specs, paths, strict=True))}
        for future in concurrent.futures.as_completed(futures):
            bar.update(1)
            bar.set_postfix_str(f"module {futures[future]}: loss {future.result()['module_loss']:.3f}")
    return paths


def phatgoose_from_modules(base: LoadedModel, paths: list[Path], rank: int, top_k: int, spec: str) -> LoadedModel:
    """One loaded PHATGOOSE model: the base with the modules stacked in order, routed top-k."""
    from seedbed.compose.phatgoose import PhatGoose
    from seedbed.train.checkpoint import load_checkpoint

    if not 1 <= top_k <= len(paths):
        raise UserError(f"--top-k must be in 1..{len(paths)}, got {top_k}")
    model = PhatGoose(base.model, len(paths), rank, top_k)
    for index, path in enumerate(paths):
        model.load_module(index, load_checkpoint(path)[0], str(path))
    model.eval()
    return LoadedModel(model, with_data(base.config, spec=spec), base.tokenizer, paths[0].parent)


def calm_from_runs(anchor: LoadedModel, augmenting: LoadedModel, spec: str, every: int, heads: int, budget: dict,
                   batch_size: int, lr: float, seed: int = 0) -> tuple[LoadedModel, Fit]:
    """A CALM model whose bridges are trained with Adam on ``spec``'s train split for ``budget``
    (``steps=N`` or ``seconds=S``), both models frozen; returns it loaded, and how the training went."""
    from seedbed.compose.calm import CALM
    from seedbed.data import load_dataset

    if anchor.tokenizer.model_proto != augmenting.tokenizer.model_proto:
        raise UserError("the anchor and the augmenting model use different tokenizers; CALM needs one")
    tokenizer = "bytes" if anchor.tokenizer.model_proto is None else None
    model = CALM(anchor.model, augmenting.model, every, heads)
    if tokenizer is None:  # the anchor's SentencePiece model, as a file the data loader can read
        path = (anchor.path if anchor.path.is_dir() else anchor.path.parent) / "tokenizer.model"
        tokenizer = f"sp:{path.resolve()}"
        if not path.is_file():
            raise UserError(f"{path} is missing: CALM reads the anchor's tokenizer from its run folder")
    tokens = torch.from_numpy(np.asarray(load_dataset(spec, tokenizer).train.tokens, np.int64))
    fit = train_steps(model, tokens, batch_size, lr, torch.Generator().manual_seed(seed), **budget)
    model.eval()
    return LoadedModel(model, with_data(anchor.config, spec=spec), anchor.tokenizer, anchor.path), fit
