"""Direction getters: the output heads of Learn2track and the TractoTransformers (spec §2.3).

Every head maps the model's hidden vectors h [N, in] to ONE raw tensor [N, K] (layout documented per
class) and provides a per-point loss, a deterministic direction, a probabilistic sample and, with EOS,
the end-of-streamline probability. Submodule names and shapes follow dwi_ml (checkpoints §2.4) so that
its state dicts load with ``strict=True``; every sub-network is a ModuleList ``[Linear(in, ceil(in/2)),
Linear(ceil(in/2), out)]`` run as Linear, ReLU, Dropout, Linear.

Differences from dwi_ml, on purpose:
- EOS losses use BCE on the logit (dwi_ml's BCE of a sigmoid saturates), and the direction loss is NOT
  evaluated on EOS rows (their target direction is undefined; dwi_ml evaluates it on a zero vector).
- Sampling is batched on the device and takes ALL its randomness from given uniforms u (inverse CDF for
  categorical choices, Box-Muller for gaussians, closed-form inverse CDF for von Mises-Fisher), so a
  tracker can derive u from per-streamline counters. dwi_ml samples fisher per point with numpy.
- ``gaussian-mixture``, ``fisher-von-mises-mixture`` and probabilistic heads with EOS work.
Kept on purpose: ``normalize_outputs`` rescales the whole regression output, EOS logit included
(dwi_ml checkpoints were trained that way).
"""

import inspect
import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from trackflow.errors import TrackflowError
from trackflow.geometry.spheres import sphere_vertices

logger = logging.getLogger(__name__)

DEFAULT_SPHERE = "symmetric724"
MAX_KAPPA = 20.0  # dwi_ml's fisher kappa = 20 * sigmoid(raw)
_MIN_KAPPA = 1e-6  # keeps log(kappa) and the vMF normaliser finite when sigmoid underflows
_LOG_2PI = math.log(2 * math.pi)
# Draws per step of the bounded rejection sampling inside the theta cone (``DirectionGetter.sample_in_cone``).
CONE_CANDIDATES = 16


def _two_layer_mlp(in_size: int, out_size: int) -> nn.ModuleList:
    hidden = math.ceil(in_size / 2)
    return nn.ModuleList([nn.Linear(in_size, hidden), nn.Linear(hidden, out_size)])


def _sample_categorical(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw of one class per row: logits [N, C], u [N] in [0, 1) -> LongTensor [N]."""
    cdf = torch.cumsum(torch.softmax(logits, dim=-1), dim=-1)  # [N, C]
    threshold = (u * cdf[:, -1]).unsqueeze(1).contiguous()
    index = torch.searchsorted(cdf.contiguous(), threshold, right=True).squeeze(1)
    return index.clamp_max(logits.shape[1] - 1)  # rounding of the last cdf value


def _standard_normals(u: torch.Tensor) -> torch.Tensor:
    """Box-Muller: u [N, 4] in [0, 1) -> three independent N(0, 1) per row, [N, 3]."""
    radius = torch.sqrt(-2 * torch.log1p(-u[:, 0::2]))  # log(1 - u): finite for u in [0, 1)
    angle = 2 * math.pi * u[:, 1::2]
    return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)[:, [0, 2, 1]]


def _von_mises_fisher_log_density(mu: torch.Tensor, kappa: torch.Tensor, unit_target: torch.Tensor) -> torch.Tensor:
    """log f(t; mu, kappa) on the sphere S^2 for mu, t [..., 3] unit and kappa [...].

    f = kappa / (2 pi (e^kappa - e^-kappa)) exp(kappa mu.t), with log(e^k - e^-k) written as
    k + log(-expm1(-2k)) to stay finite (dwi_ml floors e^k - e^-k at 1e-5 instead).
    """
    kappa = kappa.clamp_min(_MIN_KAPPA)
    log_normaliser = torch.log(kappa) - _LOG_2PI - kappa - torch.log(-torch.expm1(-2 * kappa))
    return log_normaliser + kappa * (mu * unit_target).sum(-1)


def _sample_von_mises_fisher(mu: torch.Tensor, kappa: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Exact vMF draw on S^2 from uniforms: mu [N, 3] unit, kappa [N], u [N, 2] -> unit [N, 3].

    w = mu.x follows the closed-form inverse CDF w = 1 + log(u + (1 - u) e^{-2k}) / k (written with
    log1p/expm1 for small k); the angle around mu is uniform.
    """
    kappa = kappa.clamp_min(_MIN_KAPPA)
    w = (1 + torch.log1p((1 - u[:, 0]) * torch.expm1(-2 * kappa)) / kappa).clamp(-1, 1)
    angle = 2 * math.pi * u[:, 1]
    # Orthonormal basis (e1, e2) of the plane orthogonal to mu, from whichever axis is far from mu.
    x_axis = torch.tensor([1.0, 0.0, 0.0], dtype=mu.dtype, device=mu.device).expand_as(mu)
    y_axis = torch.tensor([0.0, 1.0, 0.0], dtype=mu.dtype, device=mu.device).expand_as(mu)
    helper = torch.where(mu[:, :1].abs() < 0.9, x_axis, y_axis)
    e1 = F.normalize(helper - (helper * mu).sum(-1, keepdim=True) * mu, dim=-1)
    e2 = torch.linalg.cross(mu, e1)
    sine = torch.sqrt((1 - w * w).clamp_min(0))
    return (w[:, None] * mu + sine[:, None] * (torch.cos(angle)[:, None] * e1 + torch.sin(angle)[:, None] * e2))


def _scale_to_norm(vectors: torch.Tensor, norm: float | None) -> torch.Tensor:
    """Rescale rows to the given norm; None or 0 leaves them unchanged (dwi_ml: "if norm:")."""
    if not norm:
        return vectors
    return norm * F.normalize(vectors, dim=-1)


def _most_likely_component(mixture: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """Mean [N, 3] of each row's most probable component (mixture logits [N, C], means [N, C, 3])."""
    return means[torch.arange(means.shape[0], device=means.device), torch.argmax(mixture, dim=-1)]


def _most_likely_component_in_cone(mixture: torch.Tensor, means: torch.Tensor, previous: torch.Tensor,
                                   cos_theta: float) -> torch.Tensor:
    """``_most_likely_component`` among the components whose mean lies within theta of ``previous`` [N, 3]
    (all of them in a row where none does)."""
    inside = F.cosine_similarity(means, previous[:, None, :].to(means.dtype), dim=-1) >= cos_theta  # [N, C]
    inside |= ~inside.any(dim=1, keepdim=True)
    return _most_likely_component(mixture.masked_fill(~inside, -math.inf), means)


def _mixture_negative_log_likelihood(mixture: torch.Tensor, component_log_density: torch.Tensor) -> torch.Tensor:
    """-log sum_c softmax(mixture)_c p_c(target), per row [N], from logits and log densities [N, C]."""
    return -torch.logsumexp(F.log_softmax(mixture, dim=-1) + component_log_density, dim=-1)


class DirectionGetter(nn.Module):
    """Base class of every head (contract in docs/design.md, "Direction getters").

    Parameters
    ----------
    in_size : int
        Width of the model's hidden vectors.
    dropout : float
        Dropout between the two Linear layers of each sub-network, in [0, 1].
    add_eos : bool
        Add an end-of-streamline output (a logit, the last raw column; one more class for classification).
    eos_weight : float
        Weight of the EOS BCE term in the loss.
    """

    key: str = ""
    n_uniforms: int = 0
    supports_sampling: bool = True

    def __init__(self, in_size: int, dropout: float = 0.0, add_eos: bool = False, eos_weight: float = 1.0):
        super().__init__()
        if not 0.0 <= dropout <= 1.0:
            raise TrackflowError(f"the direction getter dropout (--dg_dropout) must be in [0, 1], got {dropout}.")
        if eos_weight < 0:
            raise TrackflowError(f"eos_weight must be >= 0, got {eos_weight}.")
        self.in_size = in_size
        self.dropout_rate = float(dropout)
        self.add_eos = bool(add_eos)
        self.eos_weight = float(eos_weight)
        self.dropout = nn.Dropout(dropout)

    def _run(self, layers: nn.ModuleList, h: torch.Tensor) -> torch.Tensor:
        return layers[1](self.dropout(F.relu(layers[0](h))))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h [N, in_size] -> raw outputs [N, K] (layout: see the class)."""
        raise NotImplementedError

    def _direction_loss(self, raw: torch.Tensor, target_dirs: torch.Tensor) -> torch.Tensor:
        """Per-point direction loss [N] for real (non-EOS) targets [N, 3]."""
        raise NotImplementedError

    def loss(self, raw: torch.Tensor, target_dirs: torch.Tensor,
             eos_target: torch.Tensor | None = None) -> torch.Tensor:
        """Per-point loss, never averaged.

        Parameters
        ----------
        raw : torch.Tensor
            [N, K] output of ``forward``.
        target_dirs : torch.Tensor
            [N, 3] raw displacements in voxel units (rows where ``eos_target`` is true are ignored).
        eos_target : torch.Tensor or None
            [N] bool, true where the streamline ends (None: no row ends). These rows get no direction
            loss; with ``add_eos`` every row gets ``eos_weight * BCE-with-logits(eos logit, eos_target)``.

        Returns
        -------
        torch.Tensor
            [N].
        """
        is_eos = self._eos_rows(raw, eos_target)
        direction_loss = self._direction_loss(raw, self._placeholder_on_eos(target_dirs, is_eos))
        loss = torch.where(is_eos, torch.zeros_like(direction_loss), direction_loss)
        if self.add_eos:
            eos_bce = F.binary_cross_entropy_with_logits(raw[:, -1], is_eos.to(raw.dtype), reduction="none")
            loss = loss + self.eos_weight * eos_bce
        return loss

    @staticmethod
    def _eos_rows(raw: torch.Tensor, eos_target: torch.Tensor | None) -> torch.Tensor:
        if eos_target is None:
            return torch.zeros(raw.shape[0], dtype=torch.bool, device=raw.device)
        return eos_target.to(device=raw.device, dtype=torch.bool)

    @staticmethod
    def _placeholder_on_eos(target_dirs: torch.Tensor, is_eos: torch.Tensor) -> torch.Tensor:
        # A finite dummy direction on EOS rows: torch.where still backpropagates through the masked
        # branch, so it must not hold NaN (e.g. a zero vector in a normalisation).
        placeholder = torch.tensor([1.0, 0.0, 0.0], dtype=target_dirs.dtype, device=target_dirs.device)
        return torch.where(is_eos[:, None], placeholder, target_dirs)

    def deterministic(self, raw: torch.Tensor) -> torch.Tensor:
        """Most likely direction [N, 3] (unit or raw; the tracker normalises)."""
        raise NotImplementedError

    def sample_from_uniforms(self, raw: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Direction [N, 3] drawn from the head's distribution; u [N, n_uniforms] in [0, 1) is its only
        source of randomness."""
        raise NotImplementedError

    def eos_probability(self, raw: torch.Tensor) -> torch.Tensor | None:
        """[N] probability that the streamline ends here (sigmoid of the EOS logit); None without EOS."""
        if not self.add_eos:
            return None
        return torch.sigmoid(raw[:, -1])

    def eos_is_most_likely(self, raw: torch.Tensor) -> torch.Tensor | None:
        """[N] bool: ending is the most likely outcome here; None without EOS. With a separate sigmoid
        output the alternatives are 'end' and 'go on', so this is p(EOS) > 0.5 (a zero logit: no end)."""
        if not self.add_eos:
            return None
        return raw[:, -1] > 0

    def deterministic_in_cone(self, raw: torch.Tensor, previous: torch.Tensor, cos_theta: float) -> torch.Tensor:
        """The most likely direction [N, 3] within theta of ``previous`` [N, 3] (unit). A head whose
        distribution has one mode has no other candidate: its mode, which the tracker's angle test stops
        when it lies outside the cone."""
        return self.deterministic(raw)

    @property
    def n_cone_uniforms(self) -> int:
        """Uniforms per row of ``sample_in_cone``: one set per candidate."""
        return CONE_CANDIDATES * self.n_uniforms

    def sample_in_cone(self, raw: torch.Tensor, u: torch.Tensor, previous: torch.Tensor,
                       cos_theta: float) -> torch.Tensor:
        """Direction [N, 3] drawn from the head's distribution restricted to the cone of directions within
        theta of ``previous`` [N, 3] (unit), i.e. cosine >= ``cos_theta``; u [N, n_cone_uniforms].

        Bounded rejection: ``CONE_CANDIDATES`` independent draws (candidate c uses the uniforms
        ``u[:, c * n_uniforms : (c + 1) * n_uniforms]``), the first one inside the cone is returned: an exact
        draw from the restricted distribution whenever one candidate is inside. When none is, the candidate
        closest to ``previous`` is returned; it is outside the cone, so the tracker stops the streamline
        there (an angle stop: the distribution has (almost) no mass left in the cone).
        """
        n, k = raw.shape[0], self.n_uniforms
        candidates = self.sample_from_uniforms(raw.repeat_interleave(CONE_CANDIDATES, dim=0),
                                               u.reshape(n * CONE_CANDIDATES, k)).reshape(n, CONE_CANDIDATES, 3)
        cosine = torch.nan_to_num(F.cosine_similarity(candidates, previous[:, None, :], dim=-1), nan=-2.0)
        inside = cosine >= cos_theta  # [N, C]
        # first candidate inside, else the closest one
        choice = torch.where(inside.any(dim=1), inside.to(torch.int8).argmax(dim=1), cosine.argmax(dim=1))
        return candidates[torch.arange(n, device=raw.device), choice]

    def _extra_args(self) -> dict:
        return {}

    def dg_args(self) -> dict:
        """The ``dg_args`` dict of ``parameters.json`` (checkpoints §1.5)."""
        return {"dropout": self.dropout_rate, "add_eos": self.add_eos, "eos_weight": self.eos_weight,
                **self._extra_args()}


# ---------------------------------------------------------------------------------------------------
# Regression


class _RegressionDirectionGetter(DirectionGetter):
    """Regression of the direction vector. Raw [N, 3 (+1)]: the direction, then the EOS logit.

    ``normalize_outputs``: the raw output (EOS logit included, dwi_ml quirk) is rescaled to this norm.
    ``normalize_targets``: targets are rescaled to this norm before the loss (no effect on cosine).
    No sampling: probabilistic tracking needs a distribution.
    """

    supports_sampling = False

    def __init__(self, in_size: int, dropout: float = 0.0, add_eos: bool = False, eos_weight: float = 1.0,
                 normalize_targets: float | None = None, normalize_outputs: float | None = None):
        super().__init__(in_size, dropout, add_eos, eos_weight)
        self.normalize_targets = normalize_targets
        self.normalize_outputs = normalize_outputs
        self.layers = _two_layer_mlp(in_size, 3 + self.add_eos)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return _scale_to_norm(self._run(self.layers, h), self.normalize_outputs)

    def deterministic(self, raw: torch.Tensor) -> torch.Tensor:
        return raw[:, :3]

    def sample_from_uniforms(self, raw: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        raise TrackflowError(f"{self.key} has no probability distribution: use deterministic tracking.")

    def _extra_args(self) -> dict:
        return {"normalize_targets": self.normalize_targets, "normalize_outputs": self.normalize_outputs}

    def _cosine_loss(self, raw: torch.Tensor, target_dirs: torch.Tensor) -> torch.Tensor:
        return 1 - F.cosine_similarity(raw[:, :3], target_dirs, dim=-1)

    def _l2_loss(self, raw: torch.Tensor, target_dirs: torch.Tensor) -> torch.Tensor:
        targets = _scale_to_norm(target_dirs, self.normalize_targets)
        return torch.linalg.vector_norm(raw[:, :3] - targets, dim=-1)


class CosineRegressionDirectionGetter(_RegressionDirectionGetter):
    """Loss 1 - cos(output, target)."""

    key = "cosine-regression"

    def _direction_loss(self, raw, target_dirs):
        return self._cosine_loss(raw, target_dirs)


class L2RegressionDirectionGetter(_RegressionDirectionGetter):
    """Loss ||output - target|| (Euclidean distance, not squared)."""

    key = "l2-regression"

    def _direction_loss(self, raw, target_dirs):
        return self._l2_loss(raw, target_dirs)


class CosinePlusL2RegressionDirectionGetter(_RegressionDirectionGetter):
    """Loss (1 - cos) + ||output - target||."""

    key = "cosine-plus-l2-regression"

    def _direction_loss(self, raw, target_dirs):
        return self._cosine_loss(raw, target_dirs) + self._l2_loss(raw, target_dirs)


# ---------------------------------------------------------------------------------------------------
# Classification on the sphere


class SphereClassificationDirectionGetter(DirectionGetter):
    """Classification over the vertices of dipy's ``symmetric724`` sphere (file order = class index).

    Raw [N, V (+1)]: logits of the V vertex classes, then the EOS class. Loss: cross-entropy against
    the vertex of maximal cosine with the target; EOS is one more class of the same softmax, and
    ``eos_weight`` weighs the loss of the rows whose target is EOS (a class weight against the imbalance
    of one end per streamline; dwi_ml refuses any value but 1, which is the same loss as here).
    Deterministic: the argmax vertex; sampling: a vertex drawn from the softmax (1 uniform, inverse CDF),
    within the theta cone: the same draw among the vertices inside the cone only. All choose among the V
    vertices only.
    ``vertices`` [V, 3] float32 is a non-persistent buffer (rebuilt from dipy, not in the state dict).
    """

    key = "sphere-classification"
    n_uniforms = 1

    def __init__(self, in_size: int, dropout: float = 0.0, add_eos: bool = False, eos_weight: float = 1.0,
                 sphere: str = DEFAULT_SPHERE):
        super().__init__(in_size, dropout, add_eos, eos_weight)
        vertices = sphere_vertices(sphere)
        self.sphere = sphere
        self.register_buffer("vertices", torch.from_numpy(vertices).to(torch.float32), persistent=False)
        self.nb_vertices = vertices.shape[0]
        self.layers = _two_layer_mlp(in_size, self.nb_vertices + self.add_eos)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self._run(self.layers, h)

    def _nearest_vertex(self, target_dirs: torch.Tensor) -> torch.Tensor:
        """[N] index of the vertex with maximal cosine (the target's norm does not change the argmax)."""
        return torch.argmax(target_dirs.to(self.vertices.dtype) @ self.vertices.T, dim=-1)

    def loss(self, raw, target_dirs, eos_target=None):
        is_eos = self._eos_rows(raw, eos_target)
        safe_targets = self._placeholder_on_eos(target_dirs, is_eos)
        loss = self._class_loss(raw, safe_targets, is_eos)
        if not self.add_eos:
            return torch.where(is_eos, torch.zeros_like(loss), loss)
        if self.eos_weight != 1.0:  # the unweighted loss stays bit-identical
            loss = torch.where(is_eos, self.eos_weight * loss, loss)
        return loss

    def _class_loss(self, raw, target_dirs, is_eos):
        classes = self._nearest_vertex(target_dirs)
        if self.add_eos:
            classes = torch.where(is_eos, self.nb_vertices, classes)
        return F.cross_entropy(raw, classes, reduction="none")

    def deterministic(self, raw):
        return self.vertices[torch.argmax(raw[:, :self.nb_vertices], dim=-1)]

    def sample_from_uniforms(self, raw, u):
        return self.vertices[_sample_categorical(raw[:, :self.nb_vertices], u[:, 0])]

    def deterministic_in_cone(self, raw, previous, cos_theta):
        """The most likely vertex among those within theta of ``previous`` (dipy's and scilpy's
        deterministic rule: the fODF's maximum inside the cone). A row with no vertex in the cone takes the
        overall argmax, so the tracker's angle test stops it."""
        return self.vertices[torch.argmax(self._logits_in_cone(raw, previous, cos_theta), dim=-1)]

    def _logits_in_cone(self, raw, previous, cos_theta):
        """The direction logits [N, V] with the vertices outside the cone at -inf (none, in a row with no
        vertex inside)."""
        inside = (previous.to(self.vertices.dtype) @ self.vertices.T) >= cos_theta  # [N, V]
        inside |= ~inside.any(dim=1, keepdim=True)
        return raw[:, :self.nb_vertices].masked_fill(~inside, -math.inf)

    n_cone_uniforms = 1

    def sample_in_cone(self, raw, u, previous, cos_theta):
        """Exact: the vertices outside the cone get probability 0, the rest is renormalised, one uniform.
        A row with no vertex in the cone draws from all of them, so the tracker's angle test stops it."""
        return self.vertices[_sample_categorical(self._logits_in_cone(raw, previous, cos_theta), u[:, 0])]

    def eos_probability(self, raw):
        if not self.add_eos:
            return None
        return torch.softmax(raw, dim=-1)[:, -1]

    def eos_is_most_likely(self, raw):
        """EOS is the argmax of all V + 1 classes (ties: a direction wins)."""
        if not self.add_eos:
            return None
        return raw[:, -1] > raw[:, :self.nb_vertices].max(dim=-1).values

    def _extra_args(self) -> dict:
        # dwi_ml never writes the sphere; only a non-default one needs recording.
        return {} if self.sphere == DEFAULT_SPHERE else {"sphere": self.sphere}


class SmoothSphereClassificationDirectionGetter(SphereClassificationDirectionGetter):
    """Sphere classification with soft targets (DeepTract style).

    Target distribution over vertices: exp(-angle / 0.1) normalised to sum 1 (angle in radians between
    the target and each vertex); with EOS it gets one more class, one-hot on EOS rows. Loss: KL(target ||
    softmax(raw)) summed over classes.
    """

    key = "smooth-sphere-classification"
    ANGLE_SCALE = 0.1

    def _class_loss(self, raw, target_dirs, is_eos):
        cosines = F.normalize(target_dirs.to(self.vertices.dtype), dim=-1) @ self.vertices.T  # [N, V]
        angles = torch.arccos(cosines.clamp(-1, 1))
        soft_targets = torch.softmax(-angles / self.ANGLE_SCALE, dim=-1)  # = exp(-a/0.1) / sum
        if self.add_eos:
            eos_column = is_eos.to(soft_targets.dtype)[:, None]
            soft_targets = torch.cat([soft_targets * (1 - eos_column), eos_column], dim=-1)
        log_probs = F.log_softmax(raw, dim=-1)
        return (torch.xlogy(soft_targets, soft_targets) - soft_targets * log_probs).sum(-1)


# ---------------------------------------------------------------------------------------------------
# Gaussian


class _GaussianBase(DirectionGetter):
    def __init__(self, in_size, dropout=0.0, add_eos=False, eos_weight=1.0, normalize_targets=None):
        super().__init__(in_size, dropout, add_eos, eos_weight)
        self.normalize_targets = normalize_targets

    @staticmethod
    def _log_density(mean: torch.Tensor, log_sigma: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """log N(target; mean, diag(sigma^2)), all [..., 3] -> [...]."""
        z = (target - mean) * torch.exp(-log_sigma)
        return -(log_sigma + 0.5 * _LOG_2PI + 0.5 * z * z).sum(-1)


class GaussianDirectionGetter(_GaussianBase):
    """Diagonal 3-D gaussian (submodules ``layers_mean`` [3 (+1 EOS)] and ``layers_sigmas`` [3]).

    Raw [N, 6 (+1)]: mean (3), log sigma (3, = dwi_ml's raw sigma output; sigma = exp), EOS logit.
    Loss: -log N(target; mean, diag sigma^2) - entropy_weight * entropy (entropy = sum(log sigma) + 1.5
    log(2 pi e)). Deterministic: the mean; sampling: mean + sigma * Box-Muller normals (4 uniforms).
    """

    key = "gaussian"
    n_uniforms = 4

    def __init__(self, in_size: int, dropout: float = 0.0, add_eos: bool = False, eos_weight: float = 1.0,
                 normalize_targets: float | None = None, entropy_weight: float = 0.0):
        super().__init__(in_size, dropout, add_eos, eos_weight, normalize_targets)
        self.entropy_weight = float(entropy_weight)
        self.layers_mean = _two_layer_mlp(in_size, 3 + self.add_eos)
        self.layers_sigmas = _two_layer_mlp(in_size, 3)

    def forward(self, h):
        means = self._run(self.layers_mean, h)
        return torch.cat([means[:, :3], self._run(self.layers_sigmas, h), means[:, 3:]], dim=-1)

    def _direction_loss(self, raw, target_dirs):
        mean, log_sigma = raw[:, :3], raw[:, 3:6]
        loss = -self._log_density(mean, log_sigma, _scale_to_norm(target_dirs, self.normalize_targets))
        if self.entropy_weight:
            entropy = log_sigma.sum(-1) + 1.5 * (_LOG_2PI + 1)
            loss = loss - self.entropy_weight * entropy
        return loss

    def deterministic(self, raw):
        return raw[:, :3]

    def sample_from_uniforms(self, raw, u):
        return raw[:, :3] + torch.exp(raw[:, 3:6]) * _standard_normals(u[:, :4])

    def _extra_args(self):
        args = {"normalize_targets": self.normalize_targets}
        if self.entropy_weight:
            args["entropy_weight"] = self.entropy_weight
        return args


class GaussianMixtureDirectionGetter(_GaussianBase):
    """Mixture of G diagonal gaussians (``layers_mixture`` [G], ``layers_mean`` [3G (+1 EOS)],
    ``layers_sigmas`` [3G]).

    Raw [N, 7G (+1)]: mixture logits (G), means (3G, component-major: x, y, z of component 0 first),
    log sigmas (3G, same order), EOS logit. Loss: -logsumexp_g(log softmax(mix)_g + log N_g(target)).
    Deterministic: mean of the most probable component; sampling: a component by inverse CDF, then
    Box-Muller (5 uniforms).
    """

    key = "gaussian-mixture"
    n_uniforms = 5

    def __init__(self, in_size: int, dropout: float = 0.0, add_eos: bool = False, eos_weight: float = 1.0,
                 normalize_targets: float | None = None, nb_gaussians: int = 3):
        super().__init__(in_size, dropout, add_eos, eos_weight, normalize_targets)
        if nb_gaussians < 1:
            raise TrackflowError(f"nb_gaussians must be >= 1, got {nb_gaussians}.")
        self.nb_gaussians = int(nb_gaussians)
        self.layers_mixture = _two_layer_mlp(in_size, nb_gaussians)
        self.layers_mean = _two_layer_mlp(in_size, 3 * nb_gaussians + self.add_eos)
        self.layers_sigmas = _two_layer_mlp(in_size, 3 * nb_gaussians)

    def forward(self, h):
        means = self._run(self.layers_mean, h)
        n_mean_columns = 3 * self.nb_gaussians
        return torch.cat([self._run(self.layers_mixture, h), means[:, :n_mean_columns],
                          self._run(self.layers_sigmas, h), means[:, n_mean_columns:]], dim=-1)

    def _split(self, raw):
        """-> mixture logits [N, G], means [N, G, 3], log sigmas [N, G, 3]."""
        g = self.nb_gaussians
        return raw[:, :g], raw[:, g:4 * g].reshape(-1, g, 3), raw[:, 4 * g:7 * g].reshape(-1, g, 3)

    def _direction_loss(self, raw, target_dirs):
        mixture, means, log_sigmas = self._split(raw)
        target = _scale_to_norm(target_dirs, self.normalize_targets)[:, None, :]
        component_log_density = self._log_density(means, log_sigmas, target)  # [N, G]
        return _mixture_negative_log_likelihood(mixture, component_log_density)

    def deterministic(self, raw):
        mixture, means, _ = self._split(raw)
        return _most_likely_component(mixture, means)

    def deterministic_in_cone(self, raw, previous, cos_theta):
        mixture, means, _ = self._split(raw)
        return _most_likely_component_in_cone(mixture, means, previous, cos_theta)

    def sample_from_uniforms(self, raw, u):
        mixture, means, log_sigmas = self._split(raw)
        rows = torch.arange(raw.shape[0], device=raw.device)
        component = _sample_categorical(mixture, u[:, 0])
        return means[rows, component] + torch.exp(log_sigmas[rows, component]) * _standard_normals(u[:, 1:5])

    def _extra_args(self):
        return {"normalize_targets": self.normalize_targets, "nb_gaussians": self.nb_gaussians}


# ---------------------------------------------------------------------------------------------------
# von Mises-Fisher


class FisherVonMisesDirectionGetter(DirectionGetter):
    """von Mises-Fisher on the unit sphere (``layers_mean`` [3 (+1 EOS)], ``layers_kappa`` [1]).

    Raw [N, 4 (+1)]: unit mean direction mu (3; the mean network's output normalised), concentration
    kappa = 20 * sigmoid(raw) in (0, 20) (1), EOS logit. Loss: -log f(unit target; mu, kappa).
    Deterministic: mu; sampling: exact inverse-CDF draw (2 uniforms).
    """

    key = "fisher-von-mises"
    n_uniforms = 2

    def __init__(self, in_size: int, dropout: float = 0.0, add_eos: bool = False, eos_weight: float = 1.0):
        super().__init__(in_size, dropout, add_eos, eos_weight)
        self.layers_mean = _two_layer_mlp(in_size, 3 + self.add_eos)
        self.layers_kappa = _two_layer_mlp(in_size, 1)

    def forward(self, h):
        means = self._run(self.layers_mean, h)
        kappa = MAX_KAPPA * torch.sigmoid(self._run(self.layers_kappa, h))
        return torch.cat([F.normalize(means[:, :3], dim=-1), kappa, means[:, 3:]], dim=-1)

    def _direction_loss(self, raw, target_dirs):
        return -_von_mises_fisher_log_density(raw[:, :3], raw[:, 3], F.normalize(target_dirs, dim=-1))

    def deterministic(self, raw):
        return raw[:, :3]

    def sample_from_uniforms(self, raw, u):
        return _sample_von_mises_fisher(raw[:, :3], raw[:, 3], u[:, :2])


class FisherVonMisesMixtureDirectionGetter(DirectionGetter):
    """Mixture of C von Mises-Fisher distributions (not implemented in dwi_ml; our submodule names:
    ``layers_mixture`` [C], ``layers_mean`` [3C (+1 EOS)], ``layers_kappa`` [C]).

    Raw [N, 5C (+1)]: mixture logits (C), unit means (3C, component-major), kappas in (0, 20) (C), EOS
    logit. Loss: -logsumexp_c(log softmax(mix)_c + log f_c(unit target)). Deterministic: mean of the most
    probable component; sampling: component by inverse CDF, then the exact vMF draw (3 uniforms).
    """

    key = "fisher-von-mises-mixture"
    n_uniforms = 3

    def __init__(self, in_size: int, dropout: float = 0.0, add_eos: bool = False, eos_weight: float = 1.0,
                 n_cluster: int = 3):
        super().__init__(in_size, dropout, add_eos, eos_weight)
        if n_cluster < 1:
            raise TrackflowError(f"n_cluster must be >= 1, got {n_cluster}.")
        self.n_cluster = int(n_cluster)
        self.layers_mixture = _two_layer_mlp(in_size, n_cluster)
        self.layers_mean = _two_layer_mlp(in_size, 3 * n_cluster + self.add_eos)
        self.layers_kappa = _two_layer_mlp(in_size, n_cluster)

    def forward(self, h):
        c = self.n_cluster
        means = self._run(self.layers_mean, h)
        unit_means = F.normalize(means[:, :3 * c].reshape(-1, c, 3), dim=-1).reshape(-1, 3 * c)
        kappas = MAX_KAPPA * torch.sigmoid(self._run(self.layers_kappa, h))
        return torch.cat([self._run(self.layers_mixture, h), unit_means, kappas, means[:, 3 * c:]], dim=-1)

    def _split(self, raw):
        """-> mixture logits [N, C], unit means [N, C, 3], kappas [N, C]."""
        c = self.n_cluster
        return raw[:, :c], raw[:, c:4 * c].reshape(-1, c, 3), raw[:, 4 * c:5 * c]

    def _direction_loss(self, raw, target_dirs):
        mixture, means, kappas = self._split(raw)
        unit_target = F.normalize(target_dirs, dim=-1)[:, None, :]
        component_log_density = _von_mises_fisher_log_density(means, kappas, unit_target)  # [N, C]
        return _mixture_negative_log_likelihood(mixture, component_log_density)

    def deterministic(self, raw):
        mixture, means, _ = self._split(raw)
        return _most_likely_component(mixture, means)

    def deterministic_in_cone(self, raw, previous, cos_theta):
        mixture, means, _ = self._split(raw)
        return _most_likely_component_in_cone(mixture, means, previous, cos_theta)

    def sample_from_uniforms(self, raw, u):
        mixture, means, kappas = self._split(raw)
        rows = torch.arange(raw.shape[0], device=raw.device)
        component = _sample_categorical(mixture, u[:, 0])
        return _sample_von_mises_fisher(means[rows, component], kappas[rows, component], u[:, 1:3])

    def _extra_args(self):
        return {"n_cluster": self.n_cluster}


_HEADS = {cls.key: cls for cls in (
    CosineRegressionDirectionGetter, L2RegressionDirectionGetter, CosinePlusL2RegressionDirectionGetter,
    SphereClassificationDirectionGetter, SmoothSphereClassificationDirectionGetter,
    GaussianDirectionGetter, GaussianMixtureDirectionGetter,
    FisherVonMisesDirectionGetter, FisherVonMisesMixtureDirectionGetter)}

DIRECTION_GETTER_KEYS = list(_HEADS)
# Head families, for the options that only some heads take.
REGRESSION_HEADS = tuple(k for k, c in _HEADS.items() if issubclass(c, _RegressionDirectionGetter))
CLASSIFICATION_HEADS = tuple(k for k, c in _HEADS.items() if issubclass(c, SphereClassificationDirectionGetter))
GAUSSIAN_HEADS = tuple(k for k, c in _HEADS.items() if issubclass(c, _GaussianBase))


def make_direction_getter(key: str, in_size: int, dg_args: dict) -> DirectionGetter:
    """Build the head named ``key`` (``parameters.json`` ``dg_key``) from its ``dg_args``.

    Keys the head does not take (e.g. ``normalize_outputs`` written for a gaussian by hand) are ignored
    with a debug log, like unknown model parameters; a null value for an option whose default is not
    None (e.g. ``"nb_gaussians": null``) means that default.
    """
    if key not in _HEADS:
        raise TrackflowError(f"unknown direction getter {key!r}; expected one of {DIRECTION_GETTER_KEYS}.")
    head_class = _HEADS[key]
    parameters = inspect.signature(head_class.__init__).parameters
    kwargs = {}
    for name, value in (dg_args or {}).items():
        if name in ("self", "in_size") or name not in parameters:
            logger.debug("direction getter %s ignores dg_args key %r", key, name)
        elif value is not None or parameters[name].default is None:
            kwargs[name] = value
    return head_class(in_size, **kwargs)


# One streamline end per ~70 points: at weight 1 the EOS class is rarely the argmax even at true ends.
# Weight 10 on unseen geometry, 3 training seeds (docs/quality.md): l2t det F1 0.770 -> 0.809, prob 0.750 -> 0.804.
CLASSIFICATION_EOS_WEIGHT = 10.0


def default_eos_weight(dg_key: str, add_eos: bool) -> float:
    """``--eos_weight`` when not given: ``CLASSIFICATION_EOS_WEIGHT`` for classification heads with EOS, else 1."""
    return CLASSIFICATION_EOS_WEIGHT if add_eos and dg_key in CLASSIFICATION_HEADS else 1.0


def dg_args_from_options(dg_key: str, *, dropout: float, add_eos: bool, eos_weight: float | None,
                         normalize_targets: float | None = None, normalize_outputs: float | None = None,
                         entropy_weight: float | None = None, nb_gaussians: int | None = None,
                         n_cluster: int | None = None) -> dict:
    """``dg_args`` as dwi_ml's CLIs write them (checkpoints §1.5), refusing head options the head ignores.

    The refusals name the train scripts' options (``--add_entropy_to_gauss`` is ``entropy_weight``,
    ``--dg_nb_gaussians`` ``nb_gaussians``, ``--dg_nb_clusters`` ``n_cluster``); the head's constructor
    checks the values.
    """
    given = {"normalize_outputs": normalize_outputs, "normalize_targets": normalize_targets,
             "add_entropy_to_gauss": entropy_weight, "dg_nb_gaussians": nb_gaussians, "dg_nb_clusters": n_cluster}
    for option, allowed in (("normalize_outputs", REGRESSION_HEADS),
                            ("normalize_targets", REGRESSION_HEADS + GAUSSIAN_HEADS),
                            ("add_entropy_to_gauss", ("gaussian",)), ("dg_nb_gaussians", ("gaussian-mixture",)),
                            ("dg_nb_clusters", ("fisher-von-mises-mixture",))):
        if given[option] is not None and dg_key not in allowed:
            raise TrackflowError(f"--{option} does not apply to --dg_key {dg_key} (only to {', '.join(allowed)})")
    if eos_weight is None:
        eos_weight = default_eos_weight(dg_key, add_eos)
    elif not add_eos and eos_weight != 1.0:
        raise TrackflowError("--eos_weight needs --add_eos (without an EOS output there is no EOS loss to weight)")
    dg_args = {"dropout": dropout, "add_eos": add_eos, "eos_weight": eos_weight}
    if dg_key in REGRESSION_HEADS:
        dg_args.update(normalize_targets=normalize_targets, normalize_outputs=normalize_outputs)
    elif dg_key in GAUSSIAN_HEADS:
        dg_args["normalize_targets"] = normalize_targets
        if entropy_weight is not None:
            dg_args["entropy_weight"] = entropy_weight
        if nb_gaussians is not None:
            dg_args["nb_gaussians"] = nb_gaussians
    elif dg_key == "fisher-von-mises-mixture" and n_cluster is not None:
        dg_args["n_cluster"] = n_cluster
    return dg_args
