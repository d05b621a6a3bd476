"""Direction getters: checkpoint layout, losses against numpy/scipy, samplers statistically, overfitting."""

import math

import numpy as np
import pytest
import torch
from dipy.data import get_sphere
from scipy import stats
from scipy.spatial.distance import cosine, euclidean
from scipy.special import log_softmax, logsumexp

from trackflow.errors import TrackflowError
from trackflow.models.direction_getters import (CLASSIFICATION_EOS_WEIGHT, CLASSIFICATION_HEADS, CONE_CANDIDATES,
                                                DIRECTION_GETTER_KEYS, dg_args_from_options, make_direction_getter)

VERTICES = get_sphere(name="symmetric724").vertices.astype(np.float32).astype(np.float64)
SAMPLING_KEYS = [k for k in DIRECTION_GETTER_KEYS if "regression" not in k]
ALL_HEADS = [(key, eos) for key in DIRECTION_GETTER_KEYS for eos in (False, True)]


# ----------------------------------------------------------------------------------------------- layout

def _expected_shapes(key, eos):
    """checkpoints §2.4 for in_size=10 (hidden 5); the fvm mixture (absent from dwi_ml) uses our names."""
    e = int(eos)
    def mlp(name, out):
        return {f"{name}.0.weight": (5, 10), f"{name}.0.bias": (5,), f"{name}.1.weight": (out, 5),
                f"{name}.1.bias": (out,)}
    if "regression" in key:
        return mlp("layers", 3 + e)
    if "classification" in key:
        return mlp("layers", 724 + e)
    if key == "gaussian":
        return {**mlp("layers_mean", 3 + e), **mlp("layers_sigmas", 3)}
    if key == "gaussian-mixture":
        return {**mlp("layers_mixture", 3), **mlp("layers_mean", 9 + e), **mlp("layers_sigmas", 9)}
    if key == "fisher-von-mises":
        return {**mlp("layers_mean", 3 + e), **mlp("layers_kappa", 1)}
    return {**mlp("layers_mixture", 3), **mlp("layers_mean", 9 + e), **mlp("layers_kappa", 3)}


@pytest.mark.parametrize("key, eos", ALL_HEADS)
def test_state_dict_keys_and_shapes(key, eos):
    head = make_direction_getter(key, 10, {"dropout": 0.0, "add_eos": eos, "eos_weight": 1.0})
    expected = _expected_shapes(key, eos)
    assert {k: tuple(v.shape) for k, v in head.state_dict().items()} == expected
    # A state dict written elsewhere with these keys loads strictly.
    foreign = {k: torch.randn(shape) for k, shape in expected.items()}
    head.load_state_dict(foreign, strict=True)
    assert torch.equal(head.state_dict()[next(iter(expected))], foreign[next(iter(expected))])


@pytest.mark.parametrize("key", DIRECTION_GETTER_KEYS)
def test_dg_args_round_trip(key):
    extra = {"gaussian": {"normalize_targets": 1.0, "entropy_weight": 0.5},
             "gaussian-mixture": {"nb_gaussians": 2}, "fisher-von-mises-mixture": {"n_cluster": 4},
             "l2-regression": {"normalize_targets": 2.0, "normalize_outputs": 1.0}}.get(key, {})
    head = make_direction_getter(key, 10, {"dropout": 0.1, "add_eos": True, "eos_weight": 1.0, **extra})
    args = head.dg_args()
    assert args["dropout"] == 0.1 and args["add_eos"] is True and args["eos_weight"] == 1.0
    assert all(args[k] == v for k, v in extra.items())
    rebuilt = make_direction_getter(key, 10, {**args, "compress_loss": False})  # unknown key ignored
    assert rebuilt.dg_args() == args
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in head.state_dict().items()}


def test_null_option_means_default():
    head = make_direction_getter("gaussian-mixture", 10, {"nb_gaussians": None, "normalize_targets": None})
    assert head.nb_gaussians == 3 and head.normalize_targets is None


def test_bad_options_rejected():
    with pytest.raises(TrackflowError):
        make_direction_getter("sphere-classification", 10, {"add_eos": True, "eos_weight": -1.0})
    with pytest.raises(TrackflowError):
        make_direction_getter("von-mises", 10, {})
    with pytest.raises(TrackflowError):
        make_direction_getter("cosine-regression", 10, {"dropout": 1.5})
    with pytest.raises(TrackflowError):
        make_direction_getter("fisher-von-mises-mixture", 10, {"n_cluster": 0})
    with pytest.raises(TrackflowError):
        make_direction_getter("cosine-regression", 10, {}).sample_from_uniforms(torch.zeros(2, 3), torch.rand(2, 1))


def _mlp_numpy(layers, h):
    w0, b0 = layers[0].weight.detach().double().numpy(), layers[0].bias.detach().double().numpy()
    w1, b1 = layers[1].weight.detach().double().numpy(), layers[1].bias.detach().double().numpy()
    return np.maximum(h @ w0.T + b0, 0) @ w1.T + b1


def test_forward_layouts_match_dwi_ml_semantics():
    torch.manual_seed(0)
    h = torch.randn(7, 10)
    hn = h.double().numpy()
    # Regression with normalize_outputs: the EOS column is part of the rescaled vector (dwi_ml quirk).
    head = make_direction_getter("cosine-regression", 10, {"add_eos": True, "normalize_outputs": 2.0})
    out = _mlp_numpy(head.layers, hn)
    expected = 2.0 * out / np.linalg.norm(out, axis=1, keepdims=True)
    np.testing.assert_allclose(head(h).detach().numpy(), expected, atol=1e-5)
    # Gaussian: [mean, log sigma, eos]; dwi_ml's sigma = exp(raw sigma output).
    head = make_direction_getter("gaussian", 10, {"add_eos": True})
    means, log_sigmas = _mlp_numpy(head.layers_mean, hn), _mlp_numpy(head.layers_sigmas, hn)
    np.testing.assert_allclose(head(h).detach().numpy(), np.hstack([means[:, :3], log_sigmas, means[:, 3:]]),
                               atol=1e-5)
    # Fisher: [unit mu, kappa = 20 sigmoid, eos].
    head = make_direction_getter("fisher-von-mises", 10, {"add_eos": True})
    means, kappa = _mlp_numpy(head.layers_mean, hn), 20 / (1 + np.exp(-_mlp_numpy(head.layers_kappa, hn)))
    mu = means[:, :3] / np.linalg.norm(means[:, :3], axis=1, keepdims=True)
    np.testing.assert_allclose(head(h).detach().numpy(), np.hstack([mu, kappa, means[:, 3:]]), atol=1e-5)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    head = make_direction_getter("cosine-regression", 10, {"dropout": 0.5})
    h = torch.randn(50, 10)
    assert not torch.equal(head(h), head(h))
    head.eval()
    assert torch.equal(head(h), head(h))


# ----------------------------------------------------------------------------------------------- losses

def _reference_direction_loss(key, head, raw, targets):
    """Closed-form per-row loss in float64 numpy/scipy from the documented raw layout."""
    losses = []
    for r, t in zip(raw, targets):
        if key in ("cosine-regression", "l2-regression", "cosine-plus-l2-regression"):
            scaled = t / np.linalg.norm(t) * head.normalize_targets if head.normalize_targets else t
            loss = 0.0
            if "cosine" in key:
                loss += cosine(r[:3], t)
            if "l2" in key:
                loss += euclidean(r[:3], scaled)
        elif key == "sphere-classification":
            loss = -log_softmax(r)[np.argmax(VERTICES @ t)]
        elif key == "smooth-sphere-classification":
            angles = np.arccos(np.clip(VERTICES @ (t / np.linalg.norm(t)), -1, 1))
            p = np.exp(-angles / 0.1)
            p /= p.sum()
            p = np.append(p, 0.0)[:len(r)]
            q = log_softmax(r)
            loss = np.sum(p[p > 0] * (np.log(p[p > 0]) - q[p > 0]))
        elif key == "gaussian":
            scaled = t / np.linalg.norm(t) * head.normalize_targets if head.normalize_targets else t
            dist = stats.multivariate_normal(r[:3], np.diag(np.exp(2 * r[3:6])))
            loss = -dist.logpdf(scaled) - head.entropy_weight * dist.entropy()
        elif key == "gaussian-mixture":
            g = head.nb_gaussians
            log_weights = log_softmax(r[:g])
            loss = -logsumexp([log_weights[i] + stats.multivariate_normal(
                r[g + 3 * i:g + 3 * i + 3], np.diag(np.exp(2 * r[4 * g + 3 * i:4 * g + 3 * i + 3]))).logpdf(t)
                for i in range(g)])
        else:
            c = 1 if key == "fisher-von-mises" else head.n_cluster
            unit = t / np.linalg.norm(t)
            if c == 1:
                log_weights, mus, kappas = [0.0], [r[:3]], [r[3]]
            else:
                log_weights, kappas = log_softmax(r[:c]), r[4 * c:5 * c]
                mus = [r[c + 3 * i:c + 3 * i + 3] for i in range(c)]
            loss = -logsumexp([lw + np.log(k) - np.log(2 * np.pi) - np.log(np.exp(k) - np.exp(-k)) + k * mu @ unit
                               for lw, mu, k in zip(log_weights, mus, kappas)])
        losses.append(loss)
    return np.array(losses)


HEAD_OPTIONS = {"l2-regression": {"normalize_targets": 2.0}, "gaussian": {"entropy_weight": 0.3},
                "gaussian-mixture": {"nb_gaussians": 2}, "fisher-von-mises-mixture": {"n_cluster": 2}}


@pytest.mark.parametrize("key, eos", ALL_HEADS)
def test_loss_matches_closed_form(key, eos):
    torch.manual_seed(1)
    n = 12
    head = make_direction_getter(key, 10, {"add_eos": eos, **HEAD_OPTIONS.get(key, {})})
    h = torch.randn(n, 10, dtype=torch.float64)
    head.double()
    raw = head(h).detach()
    targets = torch.randn(n, 3, dtype=torch.float64) * 0.7
    is_eos = torch.zeros(n, dtype=torch.bool)
    is_eos[[3, 11]] = True
    targets[11] = 0.0  # EOS rows carry no direction; a zero vector must not matter
    loss = head.loss(raw, targets, is_eos)
    assert loss.shape == (n,) and torch.isfinite(loss).all()

    raw_np, targets_np, eos_np = raw.numpy(), targets.numpy(), is_eos.numpy()
    expected = np.zeros(n)
    expected[~eos_np] = _reference_direction_loss(key, head, raw_np[~eos_np], targets_np[~eos_np])
    if eos and "classification" in key:
        # EOS is class 724 of the same softmax: plain cross-entropy on EOS rows.
        expected[eos_np] = -log_softmax(raw_np[eos_np], axis=1)[:, 724]
    elif eos:
        logit = raw_np[:, -1]
        expected += np.where(eos_np, np.logaddexp(0, -logit), np.logaddexp(0, logit))  # BCE with logits
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-7, atol=1e-9)


def test_eos_weight_and_no_direction_gradient_on_eos_rows():
    torch.manual_seed(2)
    head = make_direction_getter("gaussian", 10, {"add_eos": True, "eos_weight": 3.0})
    raw = head(torch.randn(4, 10)).detach().requires_grad_(True)
    is_eos = torch.tensor([False, True, False, True])
    loss = head.loss(raw, torch.randn(4, 3), is_eos)
    loss.sum().backward()
    logit = raw.detach()[1, -1]
    assert loss[1].item() == pytest.approx(3.0 * torch.nn.functional.softplus(-logit).item(), rel=1e-6)
    assert torch.all(raw.grad[is_eos, :6] == 0) and torch.all(raw.grad[~is_eos, :6] != 0)


@pytest.mark.parametrize("key", DIRECTION_GETTER_KEYS)
def test_eos_probability(key):
    torch.manual_seed(3)
    h = torch.randn(5, 10)
    assert make_direction_getter(key, 10, {})(h).shape[0] == 5
    assert make_direction_getter(key, 10, {}).eos_probability(torch.zeros(5, 800)) is None
    head = make_direction_getter(key, 10, {"add_eos": True})
    raw = head(h)
    if "classification" in key:
        expected = torch.softmax(raw.double(), dim=1)[:, -1]
    else:
        expected = 1 / (1 + torch.exp(-raw.double()[:, -1]))
    torch.testing.assert_close(head.eos_probability(raw).double(), expected)


# ----------------------------------------------------------------------------------------------- decoding

def test_classification_decoding_ignores_eos_class():
    head = make_direction_getter("sphere-classification", 10, {"add_eos": True})
    raw = torch.full((2, 725), -5.0)
    raw[:, 724] = 10.0  # EOS is the most likely class, but directions come from the vertices
    raw[0, 17], raw[1, 400] = 3.0, 3.0
    np.testing.assert_allclose(head.deterministic(raw).numpy(), VERTICES[[17, 400]], atol=1e-7)
    samples = _sample(head, raw, torch.Generator().manual_seed(0))
    np.testing.assert_allclose(samples.numpy(), VERTICES[[17, 400]], atol=1e-7)


def test_mixture_deterministic_is_mean_of_most_probable_component():
    head = make_direction_getter("gaussian-mixture", 10, {"nb_gaussians": 3})
    raw = torch.randn(4, 21)
    weights = raw[:, :3].argmax(1)
    expected = torch.stack([raw[i, 3 + 3 * w:6 + 3 * w] for i, w in enumerate(weights.tolist())])
    torch.testing.assert_close(head.deterministic(raw), expected)


def _sample(head, raw, generator):
    """One draw per row, with the uniforms drawn here (the tracker's decoders draw their own)."""
    u = torch.rand(raw.shape[0], head.n_uniforms, generator=generator, dtype=raw.dtype)
    return head.sample_from_uniforms(raw, u)


def _draw(head, raw, n, seed=0):
    return _sample(head, raw.expand(n, -1).contiguous(), torch.Generator().manual_seed(seed)).double().numpy()


def test_categorical_sampling_frequencies():
    head = make_direction_getter("smooth-sphere-classification", 10, {})
    probabilities = {5: 0.5, 100: 0.3, 600: 0.2}
    raw = torch.full((1, 724), -1e4)
    for index, p in probabilities.items():
        raw[0, index] = math.log(p)
    samples = _draw(head, raw, 20000)
    for index, p in probabilities.items():
        frequency = np.mean(np.all(np.isclose(samples, VERTICES[index], atol=1e-6), axis=1))
        assert abs(frequency - p) < 4 * math.sqrt(p * (1 - p) / 20000)


def test_gaussian_sampling_moments():
    head = make_direction_getter("gaussian", 10, {})
    raw = torch.tensor([[0.5, -1.0, 2.0, math.log(0.1), math.log(1.0), math.log(2.0)]])
    samples = _draw(head, raw, 40000)
    np.testing.assert_allclose(samples.mean(0), [0.5, -1.0, 2.0], atol=4 * 2.0 / 200)
    np.testing.assert_allclose(samples.std(0), [0.1, 1.0, 2.0], rtol=0.03)
    assert abs(np.corrcoef(samples.T)[0, 2]) < 0.03  # components independent
    assert stats.normaltest(samples[:, 1]).pvalue > 1e-3


def test_gaussian_mixture_sampling():
    head = make_direction_getter("gaussian-mixture", 10, {"nb_gaussians": 2})
    raw = torch.tensor([[math.log(0.25), math.log(0.75), 10.0, 0, 0, -10.0, 0, 0] + [math.log(0.5)] * 6])
    samples = _draw(head, raw, 20000)
    first = samples[:, 0] > 0
    assert abs(first.mean() - 0.25) < 4 * math.sqrt(0.25 * 0.75 / 20000)
    np.testing.assert_allclose(samples[first].mean(0), [10, 0, 0], atol=0.05)
    np.testing.assert_allclose(samples[~first].std(0), [0.5] * 3, rtol=0.05)


def _von_mises_fisher_w_cdf(w, kappa):
    return (np.exp(kappa * w) - np.exp(-kappa)) / (np.exp(kappa) - np.exp(-kappa))


@pytest.mark.parametrize("kappa", [0.5, 5.0, 19.0])
def test_fisher_sampling_distribution(kappa):
    head = make_direction_getter("fisher-von-mises", 10, {})
    mu = np.array([0.2, -0.5, 0.84])
    mu /= np.linalg.norm(mu)
    raw = torch.tensor([[*mu, kappa]], dtype=torch.float32)
    samples = _draw(head, raw, 20000)
    np.testing.assert_allclose(np.linalg.norm(samples, axis=1), 1.0, atol=1e-5)
    # Projection on mu follows the vMF marginal; the mean resultant is mu * (coth k - 1/k).
    w = samples @ mu
    assert stats.kstest(w, lambda x: _von_mises_fisher_w_cdf(x, kappa)).pvalue > 1e-3
    mean_length = 1 / np.tanh(kappa) - 1 / kappa
    np.testing.assert_allclose(samples.mean(0), mu * mean_length, atol=0.02)
    # Uniform around mu: the orthogonal part has no preferred direction.
    orthogonal = samples - w[:, None] * mu
    assert np.linalg.norm(orthogonal.mean(0)) < 0.02


def test_fisher_mixture_sampling():
    head = make_direction_getter("fisher-von-mises-mixture", 10, {"n_cluster": 2})
    raw = torch.tensor([[math.log(0.7), math.log(0.3), 1, 0, 0, 0, 0, -1, 15.0, 15.0]])
    samples = _draw(head, raw, 20000)
    first = samples[:, 0] > samples[:, 2] * -1
    assert abs(first.mean() - 0.7) < 4 * math.sqrt(0.21 / 20000)
    np.testing.assert_allclose(samples[first].mean(0), [1 / np.tanh(15) - 1 / 15, 0, 0], atol=0.02)


@pytest.mark.parametrize("key", SAMPLING_KEYS)
def test_same_seed_same_samples(key):
    torch.manual_seed(4)
    head = make_direction_getter(key, 10, {"add_eos": True})
    raw = head(torch.randn(64, 10)).detach()
    first = _sample(head, raw, torch.Generator().manual_seed(7))
    again = _sample(head, raw, torch.Generator().manual_seed(7))
    other = _sample(head, raw, torch.Generator().manual_seed(8))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert torch.isfinite(first).all() and first.shape == (64, 3)
    # All the randomness comes from u: rows depend only on their own uniforms.
    u = torch.rand(64, head.n_uniforms, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(head.sample_from_uniforms(raw[10:20], u[10:20]),
                               head.sample_from_uniforms(raw, u)[10:20])


# ----------------------------------------------------------------------------------------------- training

def _overfit(key, eos, steps=500):
    """Train a small MLP + head on one fixed batch of 16 rows (every 4th an EOS row with ``eos``).

    Returns (initial mean loss, final mean loss, head, final raw outputs, targets, EOS rows). Gradient
    clipping at 10 keeps the gaussians stable while their sigmas shrink.
    """
    generator = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    inputs = torch.randn(16, 8, generator=generator)
    targets = torch.randn(16, 3, generator=generator)
    is_eos = torch.zeros(16, dtype=torch.bool)
    if eos:
        is_eos[::4] = True
    eos_target = is_eos if eos else None
    head = make_direction_getter(key, 64, {"add_eos": eos, **HEAD_OPTIONS.get(key, {})})
    model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Tanh(), head)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only contend on the shared CPU
    try:
        for step in range(steps):
            optimizer.zero_grad()
            loss = head.loss(model(inputs), targets, eos_target).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            optimizer.step()
            if step == 0:
                initial = loss.item()
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        raw = model(inputs)
    return initial, head.loss(raw, targets, eos_target).mean().item(), head, raw, targets, is_eos


@pytest.mark.parametrize("key, eos", ALL_HEADS)
def test_head_overfits_one_batch(key, eos):
    initial, final, head, raw, targets, is_eos = _overfit(key, eos)
    if key.startswith("fisher"):  # bounded below by kappa = 20 at the target: -log(20 / 2pi) + log(1 - e^-40)
        minimum = -math.log(20 / (2 * math.pi))
        assert (final - minimum) < 0.1 * (initial - minimum)
    elif key.startswith("gaussian"):  # unbounded below (sigma -> 0): the loss must fall a lot
        assert final < initial - 5.0
    else:
        assert final < 0.1 * initial
    # Decoded directions match the targets on the rows that have one.
    real = ~is_eos
    directions = torch.nn.functional.normalize(head.deterministic(raw)[real], dim=1)
    cosines = (directions * torch.nn.functional.normalize(targets[real], dim=1)).sum(1)
    # Median: a gaussian may give up a row or two (huge sigma there) while shrinking sigma elsewhere.
    assert cosines.median() > 0.99 and cosines.mean() > 0.9
    if eos:  # every EOS row is ranked above every other row
        probability = head.eos_probability(raw)
        assert probability[is_eos].min() > probability[real].max()


# ----------------------------------------------------------------------------------------------- EOS rules, cone

def test_eos_max_stops_where_eos_is_the_argmax_even_below_one_half():
    head = make_direction_getter("sphere-classification", 10, {"add_eos": True})
    raw = torch.zeros(3, 725)
    raw[:, 724] = 3.0
    raw[0, 5] = 2.5   # EOS is the argmax, p(EOS) ~ 0.03
    raw[1, 5] = 3.5   # a direction beats EOS
    raw[2, 5] = 3.0   # a tie: the direction wins
    assert head.eos_probability(raw)[0] < 0.5
    assert head.eos_is_most_likely(raw).tolist() == [True, False, False]
    assert make_direction_getter("sphere-classification", 10, {}).eos_is_most_likely(raw[:, :724]) is None


@pytest.mark.parametrize("key", [k for k in DIRECTION_GETTER_KEYS if "classification" not in k])
def test_eos_max_of_a_sigmoid_output_is_p_above_one_half(key):
    torch.manual_seed(1)
    head = make_direction_getter(key, 10, {"add_eos": True, **HEAD_OPTIONS.get(key, {})})
    raw = head(torch.randn(200, 10) * 5)
    assert torch.equal(head.eos_is_most_likely(raw), head.eos_probability(raw) > 0.5)
    assert 0 < int(head.eos_is_most_likely(raw).sum()) < 200


@pytest.mark.parametrize("key", ["sphere-classification", "smooth-sphere-classification"])
def test_classification_eos_weight_weighs_the_eos_rows_only(key):
    torch.manual_seed(2)
    raw, targets = torch.randn(6, 725), torch.randn(6, 3)
    is_eos = torch.tensor([False, True, False, False, True, False])
    plain = make_direction_getter(key, 10, {"add_eos": True}).loss(raw, targets, is_eos)
    weighted = make_direction_getter(key, 10, {"add_eos": True, "eos_weight": 7.0}).loss(raw, targets, is_eos)
    torch.testing.assert_close(weighted, torch.where(is_eos, 7.0 * plain, plain))


@pytest.mark.parametrize("key", SAMPLING_KEYS)
def test_cone_sampling_never_leaves_the_cone_when_the_distribution_reaches_it(key):
    torch.manual_seed(4)
    head = make_direction_getter(key, 10, {"add_eos": True, **HEAD_OPTIONS.get(key, {})})
    n = 400
    raw = head(torch.randn(n, 10))
    previous = torch.nn.functional.normalize(torch.randn(n, 3), dim=1)
    cos_theta = math.cos(math.radians(40))
    u = torch.rand(n, head.n_cone_uniforms, generator=torch.Generator().manual_seed(5))
    out = head.sample_in_cone(raw, u, previous, cos_theta)
    cosine = torch.nn.functional.cosine_similarity(out, previous, dim=1)
    if "classification" in key:  # exact: every row has vertices inside a 40 degree cone
        assert head.n_cone_uniforms == 1 and bool((cosine >= cos_theta - 1e-6).all())
        return
    # bounded rejection: the first candidate inside; outside only when no candidate is inside
    k = head.n_uniforms
    candidates = torch.stack([head.sample_from_uniforms(raw, u[:, c * k:(c + 1) * k])
                              for c in range(CONE_CANDIDATES)], dim=1)
    inside = torch.nn.functional.cosine_similarity(candidates, previous[:, None], dim=-1) >= cos_theta
    reached = inside.any(dim=1)
    assert 0.3 * n < int(reached.sum()) < n  # the case is not trivial
    assert bool((cosine[reached] >= cos_theta - 1e-6).all()) and bool((cosine[~reached] < cos_theta).all())
    first = inside.to(torch.int8).argmax(dim=1)
    torch.testing.assert_close(out[reached], candidates[torch.arange(n), first][reached])


def test_cone_classification_is_the_renormalised_restricted_softmax():
    head = make_direction_getter("sphere-classification", 10, {"add_eos": True})
    torch.manual_seed(6)
    logits = torch.randn(1, 725) * 2
    previous = torch.tensor([[0.0, 0.6, 0.8]])
    cos_theta = math.cos(math.radians(30))
    m = 40000  # a uniform grid of u: the empirical frequencies are the CDF's steps
    u = ((torch.arange(m, dtype=torch.float64) + 0.5) / m).float()[:, None]
    samples = head.sample_in_cone(logits.expand(m, -1), u, previous.expand(m, -1), cos_theta)
    index = torch.argmax(samples @ head.vertices.T, dim=1)
    frequencies = torch.bincount(index, minlength=724).double() / m
    inside = (previous @ head.vertices.T)[0] >= cos_theta
    expected = torch.where(inside, torch.softmax(logits[0, :724].double(), 0), 0.0)
    expected /= expected.sum()
    assert int(inside.sum()) > 10
    torch.testing.assert_close(frequencies, expected, atol=2 / m, rtol=0)


@pytest.mark.parametrize("key", SAMPLING_KEYS)
def test_a_cone_of_180_degrees_is_the_whole_distribution(key):
    torch.manual_seed(7)
    head = make_direction_getter(key, 10, {"add_eos": True, **HEAD_OPTIONS.get(key, {})})
    raw = head(torch.randn(50, 10))
    u = torch.rand(50, head.n_cone_uniforms)
    previous = torch.nn.functional.normalize(torch.randn(50, 3), dim=1)
    torch.testing.assert_close(head.sample_in_cone(raw, u, previous, -1.0),
                               head.sample_from_uniforms(raw, u[:, :head.n_uniforms]), atol=0, rtol=0)


@pytest.mark.parametrize("key", DIRECTION_GETTER_KEYS)
def test_deterministic_in_cone_is_the_best_candidate_within_theta(key):
    """Classification: the best vertex inside the cone; mixtures: the best component inside it; one-mode
    heads: their mode. A cone of 180 degrees, or one no candidate reaches, gives the overall best."""
    torch.manual_seed(8)
    head = make_direction_getter(key, 10, {"add_eos": True, **HEAD_OPTIONS.get(key, {})})
    n = 300
    raw = head(torch.randn(n, 10)) * 3
    previous = torch.nn.functional.normalize(torch.randn(n, 3), dim=1)
    cos_theta = math.cos(math.radians(40))
    best = head.deterministic(raw)
    out = head.deterministic_in_cone(raw, previous, cos_theta)
    torch.testing.assert_close(head.deterministic_in_cone(raw, previous, -1.0), best, atol=0, rtol=0)
    if "classification" in key:
        scores = raw[:, :head.nb_vertices].masked_fill((previous @ head.vertices.T) < cos_theta, -math.inf)
        torch.testing.assert_close(out, head.vertices[scores.argmax(dim=1)], atol=0, rtol=0)
        outside = torch.nn.functional.cosine_similarity(best, previous, dim=1) < cos_theta
        assert int(outside.sum()) > n // 2  # most overall maxima lie outside: the rule changes them
        return
    if "mixture" not in key:
        torch.testing.assert_close(out, best, atol=0, rtol=0)
        return
    mixture, means, _ = head._split(raw)
    inside = torch.nn.functional.cosine_similarity(means, previous[:, None], dim=-1) >= cos_theta  # [N, C]
    some = inside.any(dim=1)
    assert 0 < int(some.sum()) < n and bool((~inside.all(dim=1) & some).any())  # not trivial
    chosen = torch.where(some, mixture.masked_fill(~inside, -math.inf).argmax(dim=1), mixture.argmax(dim=1))
    torch.testing.assert_close(out, means[torch.arange(n), chosen], atol=0, rtol=0)


@pytest.mark.parametrize("key", DIRECTION_GETTER_KEYS)
def test_eos_weight_not_given_is_10_for_classification_heads_with_eos_and_1_otherwise(key):
    def weight(add_eos, eos_weight=None):
        return dg_args_from_options(key, dropout=0.0, add_eos=add_eos, eos_weight=eos_weight)["eos_weight"]
    assert CLASSIFICATION_EOS_WEIGHT == 10.0
    assert weight(True) == (10.0 if key in CLASSIFICATION_HEADS else 1.0)
    assert weight(False) == 1.0
    assert weight(True, 1.0) == 1.0 and weight(True, 3.0) == 3.0  # given: kept (1 is what dwi_ml loads)
