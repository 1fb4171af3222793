"""Memory planner for training: GPU bytes per rank of weights, gradients, optimizer state, buffers and activations.

    python -m kosmos2.bench memory --preset xl --gpus 8 --zero 2 [--offload] [--dtype bf16|fp16]
        [--batch 1 --seq 2048 --checkpoint-activations] [--gpu-memory 24GB] [--no-freeze-all]

The model-state part follows how fairseq (no --zero: `--bf16/--fp16`, fp32 master weights, DDP) and DeepSpeed ZeRO
lay out memory, per parameter, with P the parameters, T the trainable ones (the ViT is frozen unless
--no-freeze-all) and N the GPUs:

| bytes per GPU       | DDP (fairseq) | ZeRO-1        | ZeRO-2        | ZeRO-3             | --offload (stages 1-3)          |
|---------------------|---------------|---------------|---------------|--------------------|---------------------------------|
| 16-bit weights      | 2P            | 2P            | 2P            | 2P/N + 2L          | as without                      |
| 16-bit gradients    | 2T            | 2T            | 2T/N          | 2T/N + 2L          | 0 (streamed to the CPU)         |
| fp32 master weights | 4T            | 4T/N          | 4T/N          | 4T/N               | on the CPU                      |
| fp32 gradients      | 4T            | 4T/N          | 4T/N          | 2T/N (*)           | on the CPU                      |
| Adam moments (fp32) | 8T            | 8T/N          | 8T/N          | 8T/N               | on the CPU                      |

(L = the largest single layer, gathered whole under ZeRO-3: the embedding. (*) ZeRO-3 converts gradients to fp32 one
optimizer sub-group at a time; DeepSpeed's estimate allows 2 bytes per parameter for it.) For ZeRO-2/3 these are DeepSpeed's own
estimates (`estimate_zero2_model_states_mem_needs`, `estimate_zero3_model_states_mem_needs`, which count every
parameter as trainable: tests/test_memory_plan.py checks the agreement). Buffers: DDP's gradient buckets (one more
16-bit copy of T), ZeRO's reduce / all-gather buckets (fairseq_plugins/deepspeed_config.py).

Activations are those the backward pass keeps, counted from the decoder's code (kosmos2/model/decoder.py) per token
and layer: the inputs of every LayerNorm and Linear, q, k, v and the output of the attention kernel (flash /
memory-efficient: no T x T matrix), GELU's fp32 input, and the dropout masks; with --checkpoint-activations only
each layer's input, plus one layer recomputed during the backward pass. Then the loss: logits are computed only at
learned positions (fp32 log-softmax kept), and the image side (the frozen ViT keeps nothing; the connector does).
Peak memory adds the backward pass's working gradients (about one layer's activations) and a reserve for the CUDA
context and allocator fragmentation. tests/test_memory_plan.py checks the decoder count against the tensors autograd
really saves; scripts/gpu_check.sh compares the plan with the measured peak on a GPU.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch

GIB = 2 ** 30
CUDA_CONTEXT_BYTES = int(0.75 * GIB)  # CUDA context + kernels, outside PyTorch's allocator (varies by card/driver)
FRAGMENTATION = 0.05  # allocator slack on top of the live tensors
# ZeRO-1/2's reduce and all-gather buckets, in elements (fairseq_plugins/deepspeed_config.py configures DeepSpeed with
# it). DeepSpeed's default, 5e8, holds 1 GB per 16-bit bucket, which a 24 GB card cannot spare next to xl; 2e8 still
# keeps the collectives large.
ZERO_BUCKET_ELEMENTS = 200_000_000


@dataclass
class TrainSetup:
    preset: str = "xl"
    gpus: int = 1
    gpus_per_node: int | None = None  # default: min(gpus, 8)
    zero: int = 0                      # 0: fairseq's DDP
    offload: bool = False
    dtype: str = "bf16"                # bf16 | fp16 (weights and activations; fp32 master weights)
    batch: int = 1                     # sequences per micro-batch
    seq: int = 2048                    # tokens per sequence
    learned: int | None = None         # learned (loss) tokens per sequence; default: all of them (the text stream)
    images: int | None = None          # images per micro-batch; default: one per sequence (GRIT)
    checkpoint_activations: bool = False
    no_freeze_all: bool = False        # train the ViT too
    gpu_memory: float | None = None    # bytes of the card, for the "fits" verdict


def parameter_counts(cfg, no_freeze_all: bool = False) -> dict[str, int]:
    """{all, trainable, frozen, largest_layer} of the model, counted on the meta device (nothing allocated)."""
    from .model.kosmos2 import Kosmos2Model

    with torch.device("meta"):
        model = Kosmos2Model(cfg, init_from_scratch=False)
    model.set_image_encoder_trainable(no_freeze_all)
    total = sum(p.numel() for p in model.parameters())  # a tied tensor counts once
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return {"all": total, "trainable": trainable, "frozen": total - trainable, "largest_layer": largest}


def model_state_bytes(counts: dict[str, int], setup: TrainSetup) -> dict[str, int]:
    """GPU bytes per rank of weights, gradients, master weights, fp32 gradients and Adam moments (table above)."""
    p, t, n, largest = counts["all"], counts["trainable"], setup.gpus, counts["largest_layer"]
    if setup.zero == 0:
        return {"weights": 2 * p, "gradients": 2 * t, "master_weights": 4 * t, "fp32_gradients": 4 * t,
                "optimizer": 8 * t}
    shard = 1 if setup.zero == 1 else n
    out = {"weights": 2 * p // (n if setup.zero == 3 else 1), "gradients": 2 * t // shard,
           "master_weights": 4 * t // n, "fp32_gradients": 4 * t // n, "optimizer": 8 * t // n}
    if setup.zero == 3:
        out["weights"] += 2 * largest
        out["gradients"] += 2 * largest
        out["fp32_gradients"] = 2 * t // n  # fp32 gradients exist for one optimizer sub-group at a time
    if setup.offload:
        out.update(gradients=2 * largest if setup.zero == 3 else 0, master_weights=0, fp32_gradients=0, optimizer=0)
    return out


def cpu_bytes_per_node(counts: dict[str, int], setup: TrainSetup) -> int:
    """Host memory of --offload: fp32 master weights, gradients and Adam moments of the node's shards (16 bytes per
    trained parameter), plus half again for pinned transfer buffers as DeepSpeed's estimator allows; else 0."""
    if not setup.offload:
        return 0
    per_node = setup.gpus_per_node or min(setup.gpus, 8)
    return int(1.5 * 16 * counts["trainable"] * per_node / setup.gpus)


def buffer_bytes(counts: dict[str, int], setup: TrainSetup) -> int:
    if setup.zero == 0:
        return 2 * counts["trainable"] if setup.gpus > 1 else 0  # DDP's gradient buckets (one process: no DDP)
    buckets = 2 if setup.zero == 3 else 3  # reduce bucket (double-buffered with overlap_comm) + all-gather bucket
    return buckets * 2 * min(ZERO_BUCKET_ELEMENTS, counts["trainable"])


def decoder_layer_bytes_per_token(cfg, act: int) -> int:
    """Bytes one decoder layer keeps for the backward pass per token (see the module docstring)."""
    d, f = cfg.decoder_embed_dim, cfg.decoder_ffn_embed_dim
    kept = act * (10 * d + 2 * f)  # LN/Linear inputs, q k v, attention output (+ its reshaped copy), FFN activations
    kept += 4 * f                  # GELU's input, in fp32 (the official FFN evaluates GELU in fp32)
    if cfg.dropout > 0:
        kept += 2 * d              # two bool dropout masks
    if cfg.activation_dropout > 0:
        kept += f
    return kept


def vit_layer_bytes_per_token(cfg, act: int) -> int:
    w, mlp = cfg.vision_width, int(cfg.vision_width * cfg.vision_mlp_ratio)
    return act * (10 * w + 4 * mlp)  # as a decoder layer; quick-GELU keeps its input and its sigmoid


def activation_bytes(cfg, setup: TrainSetup) -> dict[str, int]:
    act = 2
    tokens = setup.batch * setup.seq
    learned = setup.batch * (setup.learned if setup.learned is not None else setup.seq)
    images = setup.batch if setup.images is None else setup.images
    layer = decoder_layer_bytes_per_token(cfg, act) * tokens
    d = cfg.decoder_embed_dim
    if setup.checkpoint_activations:
        decoder = cfg.decoder_layers * act * d * tokens + layer  # layer inputs + one layer recomputed
    else:
        decoder = cfg.decoder_layers * layer
    decoder += tokens * (8 + act * d + (d if cfg.dropout > 0 else 0))  # token ids, final LayerNorm input, mask
    patches = (cfg.image_size // cfg.patch_size) ** 2 + 1
    q = cfg.latent_query_num
    connector = images * act * (patches * cfg.visual_output_dim + patches * d + 2 * (patches + q) * d + 3 * q * d)
    vit = images * patches * cfg.vision_layers * vit_layer_bytes_per_token(cfg, act) if setup.no_freeze_all else 0
    loss = learned * cfg.vocab_size * (act + 8)  # 16-bit logits, fp32 copy, fp32 log-softmax kept
    return {"decoder": decoder, "image_side": connector + vit, "loss": loss, "backward_working": 2 * layer}


def plan(setup: TrainSetup) -> dict:
    """Everything the planner prints, as one dict (bytes, and GiB for reading)."""
    from .config import load_preset

    if setup.zero not in (0, 1, 2, 3):
        raise ValueError(f"--zero {setup.zero}: 1, 2 or 3 (leave it out for fairseq's DDP)")
    if setup.offload and setup.zero == 0:
        raise ValueError("--offload needs --zero 1, 2 or 3 (ZeRO-Offload)")
    cfg = load_preset(setup.preset)
    counts = parameter_counts(cfg, setup.no_freeze_all)
    states = model_state_bytes(counts, setup)
    activations = activation_bytes(cfg, setup)
    buffers = buffer_bytes(counts, setup)
    live = sum(states.values()) + sum(activations.values()) + buffers
    total = int(live * (1 + FRAGMENTATION)) + CUDA_CONTEXT_BYTES
    result = {"setup": asdict(setup), "params": counts, "model_states": states,
              "model_states_total": sum(states.values()), "buffers": buffers, "activations": activations,
              "allocated_peak": live, "total_with_reserve": total, "cpu_per_node": cpu_bytes_per_node(counts, setup)}
    if setup.gpu_memory:
        result["fits"] = total <= setup.gpu_memory
    return result


def parse_memory(text: str) -> float:
    """'24GB', '80GiB', '40' -> bytes. Cards sold as "24 GB" have 24 GiB, so GB and GiB both mean 2^30 here."""
    match = re.fullmatch(r"\s*([\d.]+)\s*(GB|GiB|G)?\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"--gpu-memory {text!r}: give a size like 24GB or 80")
    return float(match.group(1)) * GIB


def gib(value: int) -> float:
    return round(value / GIB, 2)


def table(result: dict) -> str:
    s = result["setup"]
    mode = "fairseq DDP" if s["zero"] == 0 else f"ZeRO-{s['zero']}" + (" + CPU offload" if s["offload"] else "")
    lines = [f"{s['preset']} on {s['gpus']} GPU(s), {mode}, {s['dtype']}, micro-batch {s['batch']} x {s['seq']} tokens"
             f"{', activation checkpointing' if s['checkpoint_activations'] else ''}; "
             f"{result['params']['trainable']:,} of {result['params']['all']:,} parameters trained",
             f"  {'GiB per GPU':<32}"]
    rows = [*[(k.replace("_", " "), v) for k, v in result["model_states"].items()],
            ("= model states", result["model_states_total"]), ("buffers", result["buffers"]),
            *[(f"activations: {k.replace('_', ' ')}", v) for k, v in result["activations"].items()],
            ("allocated at peak", result["allocated_peak"]),
            ("+ fragmentation, CUDA context", result["total_with_reserve"] - result["allocated_peak"]),
            ("= needed per GPU", result["total_with_reserve"])]
    lines += [f"  {name:<32}{gib(value):>8.2f}" for name, value in rows]
    if result["cpu_per_node"]:
        lines.append(f"  host memory per node (offloaded optimizer): {gib(result['cpu_per_node']):.1f} GiB")
    if "fits" in result:
        lines.append(f"  fits a {s['gpu_memory'] / GIB:g} GB card: {'yes' if result['fits'] else 'no'}")
    return "\n".join(lines)
