"""The exact-score kit: a Gaussian mixture whose noised density is known in closed form at every noise level.

Component k is N(μ_k, Σ_k) with Σ_k = U_k diag(λ_k) U_kᵀ + τ_k² I (U_k orthonormal, rank r), so data can sit
near a low-dimensional set (small τ, few large λ) as images do, and everything stays O(d·r) per sample.
Under x = x0 + σ ε the component becomes N(μ_k, C_k) with C_k = Σ_k + σ² I, and with c = τ_k² + σ²

    C_k⁻¹ y = (y − U_k diag(λ/(λ + c)) U_kᵀ y) / c,          log det C_k = (d − r) log c + Σ_j log(λ_j + c)

(Woodbury). The posterior mean of x0 follows from Tweedie's formula, E[x0 | x] = x + σ² ∇ log p_σ(x)
(Efron 2011; Su part 18), with ∇ log p_σ(x) = −Σ_k w_k(x) C_k⁻¹ (x − μ_k) and w_k the responsibilities.

``ExactScoreModel`` wraps a mixture with the call signature of a diffusers ``UNet2DModel`` — ``model(sample,
timestep, class_labels=None).sample`` — and answers in any prediction type, so every scheduler can be
driven by the true score. Components carry class labels; a label selects its components, and the null
label ``num_classes`` (as in classifier-free guidance training) the whole mixture.
"""

from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DOutput

from schedulers.process import VPSchedule, expand_to, make_betas, target_from_x0_and_epsilon, to_x0_and_epsilon
from schedulers.processes import sigma_process


class GaussianMixture:
    """Σ_k π_k N(μ_k, U_k diag(λ_k) U_kᵀ + τ_k² I) on flattened samples of shape ``sample_shape``.

    Args:
        means: (K, d) component means.
        weights: (K,) mixture weights (normalized here).
        basis: (K, d, r) orthonormal columns U_k; r may be 0.
        spectrum: (K, r) variances λ_k along those columns (beyond the isotropic part).
        iso_var: (K,) isotropic variances τ_k².
        classes: (K,) class label of each component, or None for an unlabelled mixture.
        sample_shape: shape of one sample, e.g. (1, 28, 28); defaults to (d,).
    """

    def __init__(self, means, weights, basis, spectrum, iso_var, classes=None, sample_shape=None):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        K, d = self.means.shape
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.weights = self.weights / self.weights.sum()
        self.basis = torch.as_tensor(basis, dtype=torch.float64).reshape(K, d, -1)
        self.spectrum = torch.as_tensor(spectrum, dtype=torch.float64).reshape(K, -1)
        self.iso_var = torch.as_tensor(iso_var, dtype=torch.float64).reshape(K)
        self.classes = None if classes is None else torch.as_tensor(classes, dtype=torch.long)
        self.sample_shape = tuple(sample_shape) if sample_shape is not None else (d,)
        if math.prod(self.sample_shape) != d:
            raise ValueError(f"sample_shape {self.sample_shape} does not hold {d} dimensions")
        if self.basis.shape[2] != self.spectrum.shape[1]:
            raise ValueError("basis and spectrum disagree on the rank")

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_classes(self) -> int:
        return 0 if self.classes is None else int(self.classes.max()) + 1

    # ---------------------------------------------------------------- densities at noise level σ

    def _component_terms(self, x: torch.Tensor, sigma: torch.Tensor):
        """Per component: log N(x; μ_k, C_k(σ)) (N, K) and C_k⁻¹(x − μ_k) (N, K, d)."""
        sigma_sq = sigma.reshape(-1, 1) ** 2  # (N, 1)
        log_probs, precision_y = [], []
        for k in range(len(self.weights)):
            y = x - self.means[k]
            c = self.iso_var[k] + sigma_sq  # (N, 1)
            lam = self.spectrum[k]  # (r,)
            proj = y @ self.basis[k]  # (N, r)
            shrink = lam / (lam + c)  # (N, r)
            cinv_y = (y - (proj * shrink) @ self.basis[k].T) / c
            quad = (y * cinv_y).sum(1)
            logdet = (self.dim - len(lam)) * torch.log(c[:, 0]) + torch.log(lam + c).sum(1)
            log_probs.append(-0.5 * (self.dim * math.log(2 * math.pi) + logdet + quad))
            precision_y.append(cinv_y)
        return torch.stack(log_probs, 1), torch.stack(precision_y, 1)

    def _log_weights(self, class_labels, n: int) -> torch.Tensor:
        """log π_k, restricted to each sample's class (renormalized); the null label keeps them all."""
        log_w = torch.log(self.weights).expand(n, -1)
        if class_labels is None or self.classes is None:
            return log_w
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1).expand(n)
        keep = (self.classes[None, :] == labels[:, None]) | (labels[:, None] >= self.num_classes)
        log_w = torch.where(keep, log_w, torch.tensor(-math.inf, dtype=torch.float64))
        return log_w - torch.logsumexp(log_w, 1, keepdim=True)

    def _flatten(self, x, sigma):
        x = torch.as_tensor(x).to(torch.float64).reshape(-1, self.dim)
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(len(x))
        return x, sigma

    def log_prob(self, x, sigma=0.0, class_labels=None) -> torch.Tensor:
        """log p_σ(x) (or log p_σ(x | y)) of samples x under x0 + σ ε, float64, shape (N,)."""
        x, sigma = self._flatten(x, sigma)
        log_n, _ = self._component_terms(x, sigma)
        return torch.logsumexp(log_n + self._log_weights(class_labels, len(x)), 1)

    def score(self, x, sigma, class_labels=None) -> torch.Tensor:
        """∇_x log p_σ(x) = −Σ_k w_k C_k⁻¹ (x − μ_k), shaped like x."""
        shape = torch.as_tensor(x).shape
        x, sigma = self._flatten(x, sigma)
        log_n, cinv_y = self._component_terms(x, sigma)
        joint = log_n + self._log_weights(class_labels, len(x))
        resp = (joint - torch.logsumexp(joint, 1, keepdim=True)).exp()  # softmax, without its thread-pool stalls
        return (-(resp[:, :, None] * cinv_y).sum(1)).reshape(shape)

    def denoise(self, x, sigma, class_labels=None) -> torch.Tensor:
        """E[x0 | x0 + σ ε = x] by Tweedie's formula, shaped like x."""
        sigma_b = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, *([1] * (torch.as_tensor(x).ndim - 1)))
        return torch.as_tensor(x).to(torch.float64) + sigma_b**2 * self.score(x, sigma, class_labels)

    def class_log_posterior(self, x, sigma) -> torch.Tensor:
        """log p(y | x_σ) for every class y, shape (N, num_classes): the exact noisy classifier."""
        if self.classes is None:
            raise ValueError("this mixture has no class labels")
        x, sigma = self._flatten(x, sigma)
        log_n, _ = self._component_terms(x, sigma)
        joint = log_n + torch.log(self.weights)
        per_class = torch.stack(
            [torch.logsumexp(joint[:, self.classes == c], 1) for c in range(self.num_classes)], 1)
        return per_class - torch.logsumexp(per_class, 1, keepdim=True)

    def component_of(self, x) -> torch.Tensor:
        """The most probable clean component of each sample (for mode-weight histograms)."""
        x, sigma = self._flatten(x, 0.0)
        log_n, _ = self._component_terms(x, sigma)
        return (log_n + torch.log(self.weights)).argmax(1)

    # ---------------------------------------------------------------- sampling

    def sample(self, n: int, generator: torch.Generator | None = None, class_labels=None) -> torch.Tensor:
        """n exact draws, float64, shaped (n, *sample_shape)."""
        log_w = self._log_weights(class_labels, n)
        comp = torch.multinomial(log_w.exp(), 1, generator=generator)[:, 0]
        r = self.spectrum.shape[1]
        z_low = torch.randn(n, r, generator=generator, dtype=torch.float64)
        z_iso = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        low = (self.basis[comp] @ (z_low * self.spectrum[comp].sqrt())[:, :, None])[:, :, 0]
        x = self.means[comp] + low + z_iso * self.iso_var[comp].sqrt()[:, None]
        return x.reshape(n, *self.sample_shape)

    # ---------------------------------------------------------------- constructors

    @classmethod
    def random(cls, sample_shape, num_components: int, rank: int = 2, num_classes: int = 0, spread: float = 1.0,
               mode_var: float = 0.05, iso_var: float = 0.002, seed: int = 0) -> GaussianMixture:
        """A reproducible random mixture: means uniform in [−spread, spread]^d, random orthonormal bases,
        spectra uniform in [mode_var/2, mode_var], weights uniform in [1, 2] before normalizing."""
        g = torch.Generator().manual_seed(seed)
        shape = (sample_shape,) if isinstance(sample_shape, int) else tuple(sample_shape)
        d = math.prod(shape)
        means = spread * (2 * torch.rand(num_components, d, generator=g, dtype=torch.float64) - 1)
        basis = torch.linalg.qr(torch.randn(num_components, d, rank, generator=g, dtype=torch.float64))[0]
        spectrum = mode_var * (0.5 + 0.5 * torch.rand(num_components, rank, generator=g, dtype=torch.float64))
        weights = 1.0 + torch.rand(num_components, generator=g, dtype=torch.float64)
        classes = torch.arange(num_components) % num_classes if num_classes else None
        return cls(means, weights, basis, spectrum, torch.full((num_components,), iso_var), classes, shape)

    @classmethod
    def fit(cls, images: torch.Tensor, labels: torch.Tensor, rank: int = 8, min_iso_var: float = 1e-4,
            ) -> GaussianMixture:
        """One component per class: the class mean, its top-``rank`` principal directions, and the mean
        residual variance as τ² (probabilistic PCA, Tipping & Bishop 1999)."""
        shape = tuple(images.shape[1:])
        x = images.reshape(len(images), -1).to(torch.float64)
        labels = torch.as_tensor(labels, dtype=torch.long)
        means, bases, spectra, isos, weights = [], [], [], [], []
        for c in range(int(labels.max()) + 1):
            xc = x[labels == c]
            mu = xc.mean(0)
            _, s, vh = torch.linalg.svd(xc - mu, full_matrices=False)
            var = s**2 / max(len(xc) - 1, 1)
            tau2 = max(float(var[rank:].sum()) / (x.shape[1] - rank), min_iso_var)
            means.append(mu)
            bases.append(vh[:rank].T)
            spectra.append((var[:rank] - tau2).clamp(min=0))
            isos.append(tau2)
            weights.append(len(xc))
        classes = torch.arange(len(means))
        return cls(torch.stack(means), torch.tensor(weights, dtype=torch.float64), torch.stack(bases),
                   torch.stack(spectra), torch.tensor(isos), classes, shape)


class ExactScoreModel(ModelMixin, ConfigMixin):
    """A ``UNet2DModel`` stand-in whose output is exact: the mixture's true ε, x0, v, score or velocity.

    The timestep (integer or fractional) maps to the state's coefficients through the same VP schedule the
    schedulers use, or, with ``model_process="flow"``, through the straight path x = (1 − τ) x0 + τ ε at
    τ = timestep / num_train_timesteps; so ``model(x_t, t).sample`` is what a perfectly trained network of
    that process and ``prediction_type`` would say.
    Saved and loaded with ``save_pretrained`` / ``from_pretrained`` (safetensors) like any diffusers model.
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int | tuple[int, int] = 4,
        in_channels: int = 1,
        num_components: int = 1,
        rank: int = 0,
        num_class_embeds: int | None = None,
        prediction_type: str = "epsilon",
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        model_process: str = "vp",
    ):
        super().__init__()
        if model_process not in ("vp", "flow"):
            raise ValueError(f"model_process must be 'vp' or 'flow', got {model_process!r}")
        h, w = (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)
        d = in_channels * h * w
        self.register_buffer("means", torch.zeros(num_components, d, dtype=torch.float64))
        self.register_buffer("weights", torch.ones(num_components, dtype=torch.float64))
        self.register_buffer("basis", torch.zeros(num_components, d, rank, dtype=torch.float64))
        self.register_buffer("spectrum", torch.zeros(num_components, rank, dtype=torch.float64))
        self.register_buffer("iso_var", torch.ones(num_components, dtype=torch.float64))
        self.register_buffer("classes", torch.arange(num_components) % max(self.num_classes, 1))
        self.schedule = VPSchedule(make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end))
        self.process = sigma_process(self.config)  # timestep → (ᾱ, β̄) of the input state

    @property
    def num_classes(self) -> int:
        """Classes of the mixture; ``config.num_class_embeds`` counts the null class too, as in ``UNet2DModel``."""
        return self.config.num_class_embeds - 1 if self.config.num_class_embeds else 0

    @classmethod
    def from_mixture(cls, mixture: GaussianMixture, prediction_type: str = "epsilon", **schedule) -> ExactScoreModel:
        """Wrap ``mixture``; ``schedule`` takes the VP schedule's config keys (beta_schedule, …)."""
        channels, *hw = mixture.sample_shape if len(mixture.sample_shape) == 3 else (1, 1, mixture.dim)
        model = cls(sample_size=tuple(hw), in_channels=channels, num_components=len(mixture.weights),
                    rank=mixture.basis.shape[2],
                    num_class_embeds=mixture.num_classes + 1 if mixture.num_classes else None,
                    prediction_type=prediction_type, **schedule)
        for name in ("means", "weights", "basis", "spectrum", "iso_var"):
            getattr(model, name).copy_(getattr(mixture, name))
        if mixture.classes is not None:
            model.classes.copy_(mixture.classes)
        return model

    @property
    def mixture(self) -> GaussianMixture:
        c = self.config
        shape = (c.in_channels, *((c.sample_size,) * 2 if isinstance(c.sample_size, int) else c.sample_size))
        return GaussianMixture(self.means.cpu(), self.weights.cpu(), self.basis.cpu(), self.spectrum.cpu(),
                               self.iso_var.cpu(), self.classes.cpu() if self.num_classes else None, shape)

    def forward(self, sample: torch.Tensor, timestep, class_labels=None, interval=None, return_dict: bool = True):
        """The exact prediction at ``timestep``. ``interval`` (MeanFlow's t − r, ``schedulers.mean_flow``) is
        accepted and ignored: the mixture answers the instantaneous field v(z, t) = u(z, t, t), so the mean-flow
        sampler drives it as Euler's method does, a stand-in for tests rather than the exact average velocity."""
        t = torch.as_tensor(timestep, dtype=torch.float64).reshape(-1).expand(len(sample)).cpu()
        alpha, beta = self.process.coefficients(t)
        # at pure noise (the flow path's t = 1, where diffusers' flow-matching schedulers start) ᾱ = 0 and β̄ = 1:
        # answer the limit, from ᾱ = 1e-12 (x0 → the prior mean, ε → x; float64 holds the 1e12 scale)
        pure_noise = alpha == 0
        alpha, beta = alpha.masked_fill(pure_noise, 1e-12), beta.masked_fill(pure_noise, 1.0)
        x = sample.cpu().double()  # differentiable: likelihood and guidance take gradients through it
        x_ve = x / expand_to(alpha, x)  # the VE state x0 + σ ε, σ = β̄/ᾱ
        labels = None if class_labels is None else torch.as_tensor(class_labels).cpu()
        x0 = self.mixture.denoise(x_ve, beta / alpha, labels)
        _, eps = to_x0_and_epsilon("sample", x0, x, alpha, beta)
        out = target_from_x0_and_epsilon(self.config.prediction_type, x0, eps, alpha, beta)
        out = out.to(device=sample.device, dtype=sample.dtype)
        return UNet2DOutput(sample=out) if return_dict else (out,)



class ExactNoisyClassifier(ModelMixin, ConfigMixin):
    """The mixture's exact noisy classifier p(y | x_t) with the ``models.classifier.NoisyClassifier`` interface:
    ``forward(x_t, t)`` gives log-posteriors (logits) of x_t = ᾱ_t x0 + β̄_t ε under the recorded VP schedule, and
    ``features`` the same vector (for similarity guidance). Exact classifier guidance at γ = 1 then turns the
    unconditional exact score into the exact class-conditional one."""

    @register_to_config
    def __init__(self, num_classes: int = 1, num_train_timesteps: int = 1000, beta_schedule: str = "linear",
                 beta_start: float = 0.0001, beta_end: float = 0.02):
        super().__init__()
        self.schedule = VPSchedule(make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end))
        # no weights: one frozen float64 parameter tells callers the dtype to feed it
        self.precision = torch.nn.Parameter(torch.ones((), dtype=torch.float64), requires_grad=False)

    @classmethod
    def from_mixture(cls, mixture: GaussianMixture, **schedule) -> ExactNoisyClassifier:
        classifier = cls(num_classes=mixture.num_classes, **schedule)
        classifier.mixture = mixture
        return classifier

    def forward(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        t = torch.as_tensor(timestep, dtype=torch.float64).reshape(-1).expand(len(sample)).cpu()
        alpha, beta = self.schedule.coefficients(t)
        x = sample.cpu().double()
        return self.mixture.class_log_posterior(x / expand_to(alpha, x), beta / alpha).to(sample.dtype)

    def features(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        return self.forward(sample, timestep)
