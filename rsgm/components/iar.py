"""Three tiny class-conditional image autoregressive models (IARs) for 8x8 digits.

They are the offline stand-ins of the thesis' ch. 9 targets, small enough to train on one
CPU core in minutes, with the same structure that makes IARs leak:

* :class:`RasterIAR` (RAR / next-token-like): a causal transformer over the 64 pixel
  tokens in raster order; a pixel token is the digit's grey level quantised to
  ``vocab_size`` levels (sklearn digits have 17 levels, so 17 tokens are lossless).
* :class:`ScaleIAR` (VAR-like, next-scale prediction): the image as token maps at scales
  1x1, 2x2, 4x4, 8x8 (area-averaged grey levels, quantised). All tokens of a scale are
  predicted at once from the class and every coarser scale (block-causal attention); the
  input of scale k is scale k-1's embedding upsampled to k's grid, as in VAR.
* :class:`MaskedIAR` (MAR-like): 2x2 patches as 16 *continuous* tokens; a bidirectional
  transformer sees the unmasked tokens and gives a conditioning vector z per masked
  position; a small MLP diffusion head models each token with the per-token loss
  ``|| eps - eps_theta(sqrt(abar_s) x + sqrt(1-abar_s) eps | s, z) ||^2`` (methods_spec §6.1, eq. 9.3).

All are class-conditional with class dropout: during training the class is replaced by the
null class ``num_classes`` with probability ``cond_drop_prob``, so conditional and null
(CFG) outputs both exist. Class dropout acts only inside :meth:`loss` with ``train=True``;
every scoring path takes the class it is given (the attack passes true and null explicitly).

Token models expose ``tokenize``, ``logits(tokens, cond)``, ``decode``, ``sample`` and
``complete(prefix, cond)``; the masked model exposes ``tokenize``, ``decode``,
``token_losses(tokens, cond, t, mask)`` and ``sample``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def quantize(x: Tensor, vocab_size: int) -> Tensor:
    """[-1, 1] grey levels -> integer tokens 0..V-1 (nearest level)."""
    return ((x.clamp(-1, 1) + 1) / 2 * (vocab_size - 1)).round().long()


def dequantize(tokens: Tensor, vocab_size: int) -> Tensor:
    return tokens.float() / (vocab_size - 1) * 2 - 1


class _Backbone(nn.Module):
    """Pre-norm transformer encoder stack; ``mask`` is an additive (L, L) attention mask."""

    def __init__(self, dim: int, depth: int, heads: int) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, h: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.norm(self.blocks(h, mask=mask))


class _ClassCond(nn.Module):
    """Class embedding with a null class (index ``num_classes``) and class dropout."""

    def __init__(self, num_classes: int, dim: int, cond_drop_prob: float) -> None:
        super().__init__()
        self.num_classes, self.cond_drop_prob = num_classes, cond_drop_prob
        self.emb = nn.Embedding(num_classes + 1, dim)

    def drop(self, cond: Tensor) -> Tensor:
        keep = torch.rand(cond.shape[0], device=cond.device) >= self.cond_drop_prob
        return torch.where(keep, cond, torch.full_like(cond, self.num_classes))


class TokenIAR(nn.Module):
    """Shared part of the discrete-token models: a causal-or-block-causal transformer whose
    position i predicts token i from the class and the tokens before it (in its order)."""

    kind = "token"

    def __init__(self, image_size: int = 8, vocab_size: int = 17, num_classes: int = 10, dim: int = 64,
                 depth: int = 2, heads: int = 4, cond_drop_prob: float = 0.1) -> None:
        super().__init__()
        self.init_kwargs = {**getattr(self, "init_kwargs", {}), "image_size": image_size, "vocab_size": vocab_size, "num_classes": num_classes,
                            "dim": dim, "depth": depth, "heads": heads, "cond_drop_prob": cond_drop_prob}
        self.image_size, self.vocab_size, self.num_classes = image_size, vocab_size, num_classes
        self.cond = _ClassCond(num_classes, dim, cond_drop_prob)
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.zeros(self.seq_len, dim))
        nn.init.normal_(self.pos, std=0.02)
        self.backbone = _Backbone(dim, depth, heads)
        self.head = nn.Linear(dim, vocab_size)
        self.register_buffer("attn_mask", self._attn_mask(), persistent=False)

    # subclasses define seq_len, _attn_mask, _inputs, tokenize, decode, sampling order
    @property
    def null_class(self) -> int:
        return self.num_classes

    # A raster model may be run on a prefix of the sequence (causal attention); a next-scale
    # model needs whole scales, so it always runs on the full sequence.
    prefix_ok = False

    def logits(self, tokens: Tensor, cond: Tensor) -> Tensor:
        """Teacher-forced logits (B, N, V): position n is p(t_n | t_<n, cond); one network call."""
        h = self._inputs(tokens, self.cond.emb(cond))
        L = h.shape[1]
        return self.head(self.backbone(h + self.pos[:L], self.attn_mask[:L, :L]))

    def loss(self, images: Tensor, cond: Tensor, train: bool = True) -> Tensor:
        tokens = self.tokenize(images)
        if train:
            cond = self.cond.drop(cond)
        return F.cross_entropy(self.logits(tokens, cond).transpose(1, 2), tokens)

    def _steps(self) -> list[tuple[int, int]]:
        """Generation steps as (start, end) ranges of token positions, predicted together."""
        raise NotImplementedError

    @torch.no_grad()
    def complete(self, prefix: Tensor, cond: Tensor, temperature: float = 0.0, logit_noise: float = 0.0,
                 cfg: float = 0.0, generator: torch.Generator | None = None) -> Tensor:
        """Fill the positions after ``prefix`` (B, i) step by step; ``temperature=0`` is
        greedy decoding. ``logit_noise`` adds N(0, sigma^2) to the logits (the mitigation of
        §6.9); ``cfg > 0`` mixes in the null-class logits (l_c + cfg (l_c - l_null))."""
        B, n0 = prefix.shape
        tokens = torch.zeros(B, self.seq_len, dtype=torch.long, device=prefix.device)
        tokens[:, :n0] = prefix
        for a, b in self._steps():
            if b <= n0:
                continue
            seen = tokens[:, :b] if self.prefix_ok else tokens  # causal: later positions cannot matter
            lg = self.logits(seen, cond)[:, a:b]
            if cfg:
                lg = lg + cfg * (lg - self.logits(seen, torch.full_like(cond, self.null_class))[:, a:b])
            if logit_noise:
                lg = lg + logit_noise * torch.randn(lg.shape, generator=generator, device=lg.device)
            if temperature == 0:
                new = lg.argmax(-1)
            else:
                probs = F.softmax(lg / temperature, -1)
                new = torch.multinomial(probs.reshape(-1, self.vocab_size), 1, generator=generator).view(B, b - a)
            keep = torch.arange(a, b, device=prefix.device) < n0  # a step may straddle the prefix end
            tokens[:, a:b] = torch.where(keep, tokens[:, a:b], new)
        return tokens

    @torch.no_grad()
    def sample(self, cond: Tensor, temperature: float = 1.0, **kw) -> Tensor:
        prefix = torch.zeros(cond.shape[0], 0, dtype=torch.long, device=cond.device)
        return self.decode(self.complete(prefix, cond, temperature=temperature, **kw))


class RasterIAR(TokenIAR):
    """Next-token prediction over the 64 pixel tokens in raster order (causal attention)."""

    prefix_ok = True

    @property
    def seq_len(self) -> int:
        return self.image_size**2

    def _attn_mask(self) -> Tensor:
        return torch.triu(torch.full((self.seq_len, self.seq_len), float("-inf")), 1)

    def _inputs(self, tokens: Tensor, c: Tensor) -> Tensor:
        # Position 0 sees the class only; position n sees t_{n-1} (plus all earlier via attention).
        return torch.cat([c.unsqueeze(1), self.tok(tokens[:, :-1])], 1)

    def tokenize(self, images: Tensor) -> Tensor:
        return quantize(images, self.vocab_size).flatten(1)

    def decode(self, tokens: Tensor) -> Tensor:
        return dequantize(tokens, self.vocab_size).view(-1, 1, self.image_size, self.image_size)

    def _steps(self):
        return [(i, i + 1) for i in range(self.seq_len)]


class ScaleIAR(TokenIAR):
    """Next-scale prediction (VAR-like) over token maps at ``scales`` (coarse to fine)."""

    def __init__(self, scales: tuple[int, ...] = (1, 2, 4, 8), **kw) -> None:
        self.scales = tuple(scales)
        self.init_kwargs = {"scales": list(self.scales)}
        super().__init__(**kw)
        if self.scales[-1] != self.image_size:
            raise ValueError(f"the last scale must equal image_size ({self.image_size}), got {self.scales}.")

    @property
    def seq_len(self) -> int:
        return sum(s * s for s in self.scales)

    def _bounds(self) -> list[tuple[int, int]]:
        out, a = [], 0
        for s in self.scales:
            out.append((a, a + s * s))
            a += s * s
        return out

    def _attn_mask(self) -> Tensor:
        level = torch.cat([torch.full((s * s,), k) for k, s in enumerate(self.scales)])
        return torch.where(level.view(1, -1) <= level.view(-1, 1), 0.0, float("-inf"))

    def _inputs(self, tokens: Tensor, c: Tensor) -> Tensor:
        parts = [c.unsqueeze(1)]  # scale 1 is predicted from the class alone
        bounds = self._bounds()
        for k in range(1, len(self.scales)):
            a, b = bounds[k - 1]
            s0, s1 = self.scales[k - 1], self.scales[k]
            e = self.tok(tokens[:, a:b]).view(-1, s0, s0, self.tok.embedding_dim).permute(0, 3, 1, 2)
            up = F.interpolate(e, size=(s1, s1), mode="nearest")
            parts.append(up.flatten(2).transpose(1, 2))
        return torch.cat(parts, 1)

    def tokenize(self, images: Tensor) -> Tensor:
        maps = [quantize(F.adaptive_avg_pool2d(images, s), self.vocab_size).flatten(1) for s in self.scales]
        return torch.cat(maps, 1)

    def decode(self, tokens: Tensor) -> Tensor:
        a, _ = self._bounds()[-1]
        return dequantize(tokens[:, a:], self.vocab_size).view(-1, 1, self.image_size, self.image_size)

    def _steps(self):
        return self._bounds()


def ddpm_alphas_cumprod(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """The linear DDPM schedule (the one MAR's diffusion head uses)."""
    return torch.cumprod(1 - torch.linspace(beta_start, beta_end, T, dtype=torch.float64), 0).float()


class _DiffusionHead(nn.Module):
    """eps_theta(x_s | s, z): a small residual MLP on the noisy token, the timestep and z."""

    def __init__(self, token_dim: int, cond_dim: int, width: int = 128, depth: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(token_dim, width)
        self.cond = nn.Linear(cond_dim + 32, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width)) for _ in range(depth))
        self.out = nn.Linear(width, token_dim)

    @staticmethod
    def t_embed(t: Tensor, dim: int = 32) -> Tensor:
        freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2, device=t.device) / (dim // 2))
        a = t.float().unsqueeze(-1) * freqs
        return torch.cat([a.sin(), a.cos()], -1)

    def forward(self, x: Tensor, t: Tensor, z: Tensor) -> Tensor:
        h = self.inp(x) + self.cond(torch.cat([z, self.t_embed(t)], -1))
        for blk in self.blocks:
            h = h + blk(h)
        return self.out(h)


class MaskedIAR(nn.Module):
    """MAR-like masked autoregression over continuous 2x2-patch tokens with a diffusion head.

    Training: a mask ratio r ~ U[mask_min, 1] per image (MAR's ratios average about 0.86
    with the defaults), the masked tokens' diffusion loss at a random timestep,
    ``train_draws`` noise draws per token (MAR's default is 4).
    """

    kind = "masked"

    def __init__(self, image_size: int = 8, patch: int = 2, num_classes: int = 10, dim: int = 64, depth: int = 2,
                 heads: int = 4, head_width: int = 128, head_depth: int = 3, cond_drop_prob: float = 0.1,
                 mask_min: float = 0.72, train_draws: int = 4, num_timesteps: int = 1000) -> None:
        super().__init__()
        self.init_kwargs = {"image_size": image_size, "patch": patch, "num_classes": num_classes, "dim": dim, "depth": depth, "heads": heads,
                            "head_width": head_width, "head_depth": head_depth, "cond_drop_prob": cond_drop_prob,
                            "mask_min": mask_min, "train_draws": train_draws, "num_timesteps": num_timesteps}
        self.image_size, self.patch, self.num_classes = image_size, patch, num_classes
        self.mask_min, self.train_draws = mask_min, train_draws
        self.n_tokens, self.token_dim = (image_size // patch) ** 2, patch * patch
        self.cond = _ClassCond(num_classes, dim, cond_drop_prob)
        self.inp = nn.Linear(self.token_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.pos = nn.Parameter(0.02 * torch.randn(self.n_tokens + 1, dim))
        self.backbone = _Backbone(dim, depth, heads)
        self.head = _DiffusionHead(self.token_dim, dim, head_width, head_depth)
        self.register_buffer("alphas_cumprod", ddpm_alphas_cumprod(num_timesteps))

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def num_timesteps(self) -> int:
        return self.alphas_cumprod.numel()

    def tokenize(self, images: Tensor) -> Tensor:
        p = self.patch
        return F.unfold(images, p, stride=p).transpose(1, 2)  # (B, N, p*p)

    def decode(self, tokens: Tensor) -> Tensor:
        return F.fold(tokens.transpose(1, 2), self.image_size, self.patch, stride=self.patch)

    def random_mask(self, B: int, ratio: Tensor | float, generator: torch.Generator | None = None, device=None) -> Tensor:
        """Boolean (B, N) mask, True = masked (to predict); round(ratio * N) tokens, at least one."""
        ratio = torch.as_tensor(ratio, dtype=torch.float32, device=device).expand(B)
        n_mask = (ratio * self.n_tokens).round().clamp(1, self.n_tokens).long()
        order = torch.rand(B, self.n_tokens, generator=generator, device=device).argsort(-1)
        return order.argsort(-1) < n_mask.unsqueeze(-1)

    def encode(self, tokens: Tensor, cond: Tensor, mask: Tensor) -> Tensor:
        """Backbone: conditioning vectors z (B, N, dim) for every position; one network call."""
        h = torch.where(mask.unsqueeze(-1), self.mask_token, self.inp(tokens))
        h = torch.cat([self.cond.emb(cond).unsqueeze(1), h], 1) + self.pos
        return self.backbone(h)[:, 1:]

    def head_loss(self, tokens: Tensor, z: Tensor, t: Tensor, eps: Tensor, token_noise: Tensor | None = None) -> Tensor:
        """Per-token diffusion loss (..., N) for noise ``eps`` at timesteps ``t`` (..., N).

        ``token_noise`` (same shape as ``eps``): the defended output (mitigation, §6.9). The
        head's prediction is returned as a clean token ``x0_hat = (x_t - sqrt(1-abar) eps_hat)
        / sqrt(abar)`` plus this noise, and the loss is computed from the noise prediction it
        implies, ``eps_hat' = (x_t - sqrt(abar) (x0_hat + n)) / sqrt(1-abar) = eps_hat -
        sqrt(abar / (1-abar)) n``: the same N(0, sigma^2) on the continuous tokens that
        sampling with ``token_noise`` adds."""
        ab = self.alphas_cumprod[t].unsqueeze(-1)
        x_t = ab.sqrt() * tokens + (1 - ab).sqrt() * eps
        eps_hat = self.head(x_t, t, z)
        if token_noise is not None:
            eps_hat = eps_hat - (ab / (1 - ab)).sqrt() * token_noise
        return (eps_hat - eps).pow(2).mean(-1)

    def token_losses(self, tokens: Tensor, cond: Tensor, t: int | Tensor, mask: Tensor, eps: Tensor,
                     token_noise: Tensor | None = None) -> Tensor:
        """Per-token diffusion loss (B, N) at timestep ``t``, averaged over the noise draws
        ``eps`` (draws, B, N, D); NaN where the token is not masked. One backbone call; the
        head runs once on all draws together. ``token_noise`` (draws, B, N, D): noise on the
        head's clean-token prediction of each draw (the defended API, see :meth:`head_loss`)."""
        z = self.encode(tokens, cond, mask)
        K, (B, N, D) = eps.shape[0], tokens.shape
        tt = torch.as_tensor(t, device=tokens.device).long().expand(K, B, N)
        loss = self.head_loss(tokens.expand(K, B, N, D), z.expand(K, B, N, z.shape[-1]), tt, eps, token_noise).mean(0)
        return torch.where(mask, loss, torch.full_like(loss, float("nan")))

    def loss(self, images: Tensor, cond: Tensor, train: bool = True) -> Tensor:
        tokens = self.tokenize(images)
        if train:
            cond = self.cond.drop(cond)
        B = tokens.shape[0]
        ratio = self.mask_min + (1 - self.mask_min) * torch.rand(B, device=tokens.device)
        mask = self.random_mask(B, ratio, device=tokens.device)
        t = torch.randint(0, self.num_timesteps, (self.train_draws, B, self.n_tokens), device=tokens.device)
        z = self.encode(tokens, cond, mask)
        K, N, D = self.train_draws, self.n_tokens, self.token_dim
        eps = torch.randn(K, B, N, D, device=tokens.device)
        per = self.head_loss(tokens.expand(K, B, N, D), z.expand(K, B, N, z.shape[-1]), t, eps).mean(0)
        return (per * mask).sum() / mask.sum()

    @torch.no_grad()
    def head_sample(self, z: Tensor, steps: int = 50, generator: torch.Generator | None = None) -> Tensor:
        """Deterministic DDIM from pure noise to a token, given z (..., dim)."""
        T = self.num_timesteps
        ts = torch.linspace(T - 1, 0, steps).round().long().tolist()
        x = torch.randn(*z.shape[:-1], self.token_dim, generator=generator, device=z.device)
        for i, t in enumerate(ts):
            ab = self.alphas_cumprod[t]
            ab_next = self.alphas_cumprod[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0, device=z.device)
            eps = self.head(x, torch.full(x.shape[:-1], t, device=z.device), z)
            x0 = ((x - (1 - ab).sqrt() * eps) / ab.sqrt()).clamp(-1.5, 1.5)
            x = ab_next.sqrt() * x0 + (1 - ab_next).sqrt() * eps
        return x

    @torch.no_grad()
    def complete(self, prefix_tokens: Tensor, known: Tensor, cond: Tensor, ar_steps: int = 4, token_noise: float = 0.0,
                 generator: torch.Generator | None = None, head_steps: int = 50) -> Tensor:
        """Fill the unknown tokens in ``ar_steps`` rounds of random order (MAR sampling);
        ``known`` (B, N) marks given tokens. ``token_noise`` adds N(0, sigma^2) to each
        sampled token (the MAR mitigation of §6.9)."""
        tokens, known = prefix_tokens.clone(), known.clone()
        B = tokens.shape[0]
        for step in range(ar_steps):
            todo = ~known
            left = todo.sum(1)
            if int(left.max()) == 0:
                break
            n_now = torch.ceil(left.float() / (ar_steps - step)).long()
            order = torch.where(todo, torch.rand(B, self.n_tokens, generator=generator, device=tokens.device), torch.full(todo.shape, 2.0, device=tokens.device))
            rank = order.argsort(1).argsort(1)
            pick = todo & (rank < n_now.unsqueeze(1))
            z = self.encode(tokens, cond, ~known)
            new = self.head_sample(z, head_steps, generator)
            if token_noise:
                new = new + token_noise * torch.randn(new.shape, generator=generator, device=new.device)
            tokens = torch.where(pick.unsqueeze(-1), new, tokens)
            known = known | pick
        return tokens

    @torch.no_grad()
    def sample(self, cond: Tensor, generator: torch.Generator | None = None, **kw) -> Tensor:
        B = cond.shape[0]
        zeros = torch.zeros(B, self.n_tokens, self.token_dim, device=cond.device)
        known = torch.zeros(B, self.n_tokens, dtype=torch.bool, device=cond.device)
        return self.decode(self.complete(zeros, known, cond, generator=generator, **kw)).clamp(-1, 1)


BUILTIN_IARS = {"RasterIAR": RasterIAR, "ScaleIAR": ScaleIAR, "MaskedIAR": MaskedIAR}
