"""The embedded default: a real diffusers-layout FLUX folder at toy size, created offline.

`python -m fluxtrain.models.tiny --out DIR` writes all seven components. Tokenizers are built with the
`tokenizers` library over the synthetic grammar's words (any other text still tokenizes, letter by letter); text
encoders are tiny random T5/CLIP (frozen, so their features only need to tell prompts apart); the VAE is trained
here on the synthetic shapes so that decoded images look like the data. The shipped copy lives in
fluxtrain/assets/tiny-flux and FluxPipeline.from_pretrained loads it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import string
import time
from pathlib import Path

import numpy as np
import torch

WORDS = ("a an one two three four red green blue yellow purple orange white black circle circles square squares "
         "triangle triangles to the left right of above below and").split()
TEXT_DIM = 64  # T5 d_model = joint_attention_dim; CLIP hidden = pooled_projection_dim
VAE_CHANNELS = (16, 32, 32)  # three blocks: ×4 downsampling, so 64 px images are 16×16 latents → 64 tokens
SHIPPED = Path(__file__).resolve().parent.parent / "assets" / "tiny-flux"


def tiny_folder() -> Path:
    """The shipped tiny FLUX folder."""
    if not (SHIPPED / "model_index.json").is_file():
        raise FileNotFoundError(f"{SHIPPED} is missing: run `python -m fluxtrain.models.tiny --out {SHIPPED}`")
    return SHIPPED


def _clip_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    # A CLIP-style BPE (end-of-word suffix "</w>") trained on the grammar: every grammar word is one token.
    bpe = Tokenizer(models.BPE(unk_token="<|endoftext|>", end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|startoftext|>", "<|endoftext|>"],
                                  initial_alphabet=list(string.ascii_lowercase + string.digits),
                                  end_of_word_suffix="</w>", show_progress=False)
    bpe.train_from_iterator([" ".join(WORDS)] * 4, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = CLIPTokenizer(vocab=model["vocab"], merges=merges, model_max_length=77)
    tok.save_pretrained(out)


def _t5_tokenizer(out: Path) -> None:
    from transformers import T5TokenizerFast

    # Unigram vocabulary, as T5's SentencePiece: pad/eos/unk, "▁word" pieces for the grammar, then letters.
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{w}", -1.0) for w in WORDS]
    pieces += [(c, -5.0) for c in string.ascii_lowercase + string.digits + string.punctuation]
    pieces += [(f"▁{c}", -4.0) for c in string.ascii_lowercase]
    tok = T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)
    tok.save_pretrained(out)


def _text_encoders(out: Path, clip_vocab: int, t5_vocab: int) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=clip_vocab, hidden_size=TEXT_DIM, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=TEXT_DIM))
    clip.save_pretrained(out / "text_encoder")
    t5 = T5EncoderModel(T5Config(vocab_size=t5_vocab, d_model=TEXT_DIM, d_kv=16, d_ff=128, num_layers=2,
                                 num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0,
                                 feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1))
    t5.save_pretrained(out / "text_encoder_2")


def _scheduler(out: Path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                    base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                    max_image_seq_len=4096).save_pretrained(out / "scheduler")


def _transformer(out: Path) -> None:
    from fluxtrain.models.flux import build_transformer, init_weights

    from fluxtrain.models.presets import transformer_kwargs

    model = build_transformer("tiny", device="cpu")
    init_weights(model, transformer_kwargs("tiny"), seed=0)
    model.save_pretrained(out / "transformer")


def new_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=VAE_CHANNELS,
                         layers_per_block=1, latent_channels=16, norm_num_groups=8, sample_size=64,
                         use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False)


def _shapes_batch(items: list[dict]) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(it["image"], dtype=np.float32) for it in items])).permute(0, 3, 1, 2) / 127.5 - 1


class _Render:  # a picklable collate_fn: indices → image batch
    def __init__(self, data):
        self.data = data

    def __call__(self, idx: list[int]) -> torch.Tensor:
        return _shapes_batch([self.data[i] for i in idx])


def train_vae(steps: int = 800, size: int = 64, batch: int = 16, seed: int = 0, device: str = "cpu",
              workers: int = 0, log=print):
    """Train the tiny VAE on synthetic shapes (reconstruction + a light KL), then set FLUX's latent scale/shift."""
    from torch.utils.data import DataLoader

    from fluxtrain.data.synthetic import SyntheticShapes

    torch.manual_seed(seed)
    data = SyntheticShapes(size=size, complex_frac=0.5, seed=seed + 7)
    vae = new_vae().to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.05)
    # batch i = items i·batch … (i+1)·batch − 1 whatever the worker count (rendering is the CPU cost)
    loader = DataLoader(range(steps * batch), batch_size=batch, num_workers=workers,
                        collate_fn=_Render(data))

    t0 = time.time()
    for step, x in enumerate(loader):
        x = x.to(device)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = (rec - x).abs().mean() + 0.5 * ((rec - x) ** 2).mean() + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    vae.eval()
    with torch.no_grad():
        # With a near-zero KL weight the decoder learns to ignore posterior noise and the encoder keeps std ≈ the
        # latents' own spread, so sampled training latents would be mostly noise. The decoder reconstructs from
        # the mean alone, so shrink the posterior (logvar − 6, std × e⁻³), as real FLUX VAEs have small std.
        half = vae.encoder.conv_out.bias.shape[0] // 2
        vae.encoder.conv_out.bias[half:] -= 6.0
        held_out = _shapes_batch([data[10**8 + i] for i in range(4 * batch)]).to(device)
        z = vae.encode(held_out).latent_dist.mean
    vae.register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1.0 / z.std()))
    return vae.cpu()


def reconstruction_adherence(vae_folder: str | Path, n: int = 200, complex_frac: float = 1.0, seed: int = 7) -> float:
    """The checker's pass rate on VAE round trips of ground-truth scenes: the ceiling of any model trained on it."""
    from fluxtrain.data.synthetic import SyntheticShapes
    from fluxtrain.eval.shapes_checker import check
    from fluxtrain.models.encoders import Autoencoder

    ae = Autoencoder(vae_folder)
    ds = SyntheticShapes(64, complex_frac=complex_frac, seed=seed)
    items = [ds[i] for i in range(n)]
    mean, _ = ae.moments(_shapes_batch(items))
    rec = ((ae.decode(mean).permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    return float(np.mean([check(im, it["caption"]).passed for im, it in zip(rec, items)]))


def _binding_labels(caption: str) -> list[tuple[int, int, int, int] | None]:
    """Per word: (colour, shape, count − 1, role) of the object phrase the word is in, None outside one. Role: 0 no
    relation, 1 + r the first object of relation r, 5 + r the second (r indexes RELATIONS)."""
    from fluxtrain.data.prompts import COLORS, COUNT_WORDS, RELATIONS, SHAPES

    words, out, i, pending = caption.split(), [], 0, None
    while i < len(words):
        if words[i] in COUNT_WORDS and i + 2 < len(words) and words[i + 1] in COLORS:
            rel = next((r for r in RELATIONS if " ".join(words[i + 3:i + 3 + len(r.split())]) == r), None)
            role = 5 + pending if pending is not None else (1 + RELATIONS.index(rel) if rel else 0)
            pending = RELATIONS.index(rel) if rel else None
            lab = (list(COLORS).index(words[i + 1]), SHAPES.index(words[i + 2].rstrip("s")),
                   COUNT_WORDS[words[i]] - 1, role)
            out += [lab] * 3
            i += 3
        else:
            out.append(None)
            i += 1
    return out


def train_text_binding(folder: str | Path, out: str | Path, steps: int = 600, batch: int = 256, seed: int = 0,
                       device: str = "cpu", log=print) -> Path:
    """A copy of a tiny FLUX folder whose T5 is trained to bind: every token of an object phrase predicts that
    object's colour, shape, count and relation role from its own output vector (linear heads, dropped after).
    A random T5 spreads a caption's facts over its tokens (a linear probe reads a noun's colour from the noun's
    vector ~40% of the time, chance 12.5%), so the transformer must learn the binding itself; pretrained T5s hand
    it over, and this stands in for that pretraining on the synthetic grammar. CLIP's pooled vector already
    encodes every fact linearly and is kept."""
    import random

    from transformers import T5EncoderModel, T5TokenizerFast

    from fluxtrain.data.prompts import format_spec, sample_spec

    out = Path(out)
    if out.resolve() in (Path(folder).resolve(), SHIPPED.resolve()):
        raise ValueError(f"train_text_binding writes a copy: give an --out other than {out} (the source or the "
                         "shipped folder)")
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(folder, out)
    tok = T5TokenizerFast.from_pretrained(out / "tokenizer_2")
    t5 = T5EncoderModel.from_pretrained(out / "text_encoder_2").to(device).train()
    torch.manual_seed(seed)
    heads = torch.nn.ModuleList(torch.nn.Linear(TEXT_DIM, k) for k in (8, 3, 4, 9)).to(device)
    opt = torch.optim.AdamW([*t5.parameters(), *heads.parameters()], lr=2e-3, weight_decay=0.0)
    rng = random.Random(seed)
    t0 = time.time()
    for step in range(steps):
        caps = [format_spec(sample_spec(rng, 0.5)) for _ in range(batch)]  # held-out prompts excluded
        enc = tok(caps, padding=True, return_tensors="pt")
        labels = torch.full((len(caps), enc.input_ids.shape[1], 4), -100, dtype=torch.long)
        for b, cap in enumerate(caps):
            words = _binding_labels(cap)
            for t, w in enumerate(enc.word_ids(b)):
                if w is not None and words[w] is not None:
                    labels[b, t] = torch.tensor(words[w])
        h = t5(enc.input_ids.to(device), attention_mask=enc.attention_mask.to(device))[0]
        labels = labels.to(device)
        loss = sum(torch.nn.functional.cross_entropy(head(h).flatten(0, 1), labels[..., k].flatten())
                   for k, head in enumerate(heads))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"t5 binding step {step} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    t5.eval().cpu().save_pretrained(out / "text_encoder_2")
    return out


def build(out: str | Path, vae_from: str | Path | None = None, vae_steps: int = 800, device: str = "cpu",
          workers: int = 0, batch: int = 16) -> Path:
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    _clip_tokenizer(out / "tokenizer")
    _t5_tokenizer(out / "tokenizer_2")
    from transformers import CLIPTokenizer, T5TokenizerFast

    _text_encoders(out, len(CLIPTokenizer.from_pretrained(out / "tokenizer")),
                   len(T5TokenizerFast.from_pretrained(out / "tokenizer_2")))
    _scheduler(out)
    _transformer(out)
    if vae_from:
        from diffusers import AutoencoderKL

        AutoencoderKL.from_pretrained(Path(vae_from) / "vae").save_pretrained(out / "vae")
    else:
        train_vae(steps=vae_steps, batch=batch, device=device, workers=workers).save_pretrained(out / "vae")
    index = {
        "_class_name": "FluxPipeline",
        "_diffusers_version": "0.32.0",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Create the tiny diffusers-layout FLUX folder")
    ap.add_argument("--out", default=str(SHIPPED))
    ap.add_argument("--vae-from", default=None, help="reuse the VAE of an existing tiny folder")
    ap.add_argument("--vae-steps", type=int, default=800)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=0, help="processes rendering the VAE's training shapes")
    ap.add_argument("--check", action="store_true", help="print the checker's pass rate on VAE round trips")
    ap.add_argument("--text-binding", default=None, metavar="FOLDER",
                    help="instead: copy FOLDER to --out with its T5 trained to bind (train_text_binding)")
    ap.add_argument("--text-steps", type=int, default=600)
    a = ap.parse_args()
    if a.text_binding:
        print(train_text_binding(a.text_binding, a.out, a.text_steps, device=a.device))
        raise SystemExit(0)
    out = build(a.out, a.vae_from, a.vae_steps, a.device, a.workers, a.batch)
    print(out)
    if a.check:
        print(f"VAE round trip passes the checker: simple {reconstruction_adherence(out, complex_frac=0.0):.3f}, "
              f"complex {reconstruction_adherence(out, complex_frac=1.0):.3f}")
