"""Dataset-inference statistics against scipy / sklearn and hand-made cases."""

import numpy as np
import pytest
import torch
from scipy import stats as sps

from rsgm.privacy import stats as S


def test_welch_matches_scipy_one_sided():
    rng = np.random.default_rng(0)
    a = rng.normal(0.3, 1.0, size=(7, 40))
    b = rng.normal(0.0, 2.0, size=(7, 25))
    t, df, p = S.welch_t_test(torch.from_numpy(a), torch.from_numpy(b))
    ref = sps.ttest_ind(a, b, axis=-1, equal_var=False, alternative="greater")
    np.testing.assert_allclose(t.numpy(), ref.statistic, rtol=1e-10)
    np.testing.assert_allclose(p.numpy(), ref.pvalue, rtol=1e-8)
    np.testing.assert_allclose(df.numpy(), ref.df, rtol=1e-10)


def test_welch_rejects_tiny_groups():
    with pytest.raises(ValueError, match="at least 2"):
        S.welch_t_test(torch.ones(1), torch.ones(3))


def test_power_matches_monte_carlo_and_normal_limit():
    # Large samples: the noncentral t power approaches Phi(nc - z_{1-alpha}).
    d, n = 0.1, 5000
    nc = d * np.sqrt(n * n / (2 * n))
    np.testing.assert_allclose(float(S.ttest_power(d, n, n, 0.01)), sps.norm.sf(sps.norm.isf(0.01) - nc), atol=2e-3)
    # Small samples: rejection rate of the one-sided pooled t-test under effect d.
    rng = np.random.default_rng(1)
    n1, n2, d = 12, 18, 0.8
    a = rng.normal(d, 1, size=(40000, n1))
    b = rng.normal(0, 1, size=(40000, n2))
    rate = (sps.ttest_ind(a, b, axis=1, alternative="greater").pvalue < 0.05).mean()
    assert abs(float(S.ttest_power(d, n1, n2, 0.05)) - rate) < 0.01


def test_cohen_d_hand_computed():
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 2.0])
    pooled = np.sqrt((2 * 1.0 + 1 * 2.0) / 3)
    assert float(S.cohen_d(a, b)) == pytest.approx(1.0 / pooled)


def test_batched_logistic_matches_sklearn():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    X = rng.normal(size=(3, 60, 4)) * np.array([1, 10, 0.1, 3])
    y = (rng.random(60) < 0.5).astype(float)
    w = (rng.random((3, 60)) < 0.8).astype(float)
    beta, b0, mean, scale = S.batched_logistic_regression(torch.from_numpy(X), torch.from_numpy(y), torch.from_numpy(w), C=0.7)
    for i in range(3):
        m = w[i] > 0
        sc = StandardScaler().fit(X[i][m])
        lr = LogisticRegression(C=0.7, tol=1e-10, max_iter=10000).fit(sc.transform(X[i][m]), y[m])
        np.testing.assert_allclose(beta[i].numpy(), lr.coef_[0], atol=1e-6)
        np.testing.assert_allclose(float(b0[i]), lr.intercept_[0], atol=1e-6)
        np.testing.assert_allclose(scale[i].numpy(), sc.scale_, rtol=1e-10)


def test_cross_fit_never_scores_with_a_model_that_saw_the_sample():
    rng = np.random.default_rng(0)
    FP, FU = rng.normal(size=(23, 3)), rng.normal(size=(31, 3))
    # Column 0 becomes a unique sample id; the spy model records ids it was fitted on.
    FP[:, 0], FU[:, 0] = np.arange(23), 100 + np.arange(31)
    scored = []

    def spy(X_train, y_train, X_test):
        seen = set(X_train[:, 0].tolist())
        ids = X_test[:, 0].tolist()
        assert not seen.intersection(ids)
        scored.extend(ids)
        return S.sklearn_fit_score(X_train, y_train, X_test)

    S.cross_fit_scores(FP, FU, k=5, seed=3, fit_score=spy)
    assert sorted(scored) == sorted(FP[:, 0].tolist() + FU[:, 0].tolist())  # each exactly once


def test_batched_cross_fit_scores_ignore_held_out_fold():
    # Changing one sample's features must leave every other score of its own fold unchanged
    # (its fold's model never saw it) and change the scores of the other folds.
    rng = np.random.default_rng(0)
    members, nonmembers = torch.from_numpy(rng.normal(0.5, 1, (40, 3))), torch.from_numpy(rng.normal(0, 1, (40, 3)))
    draw = S.draw_trials(40, 40, 20, 20, trials=1, k=5, seed=1)
    base = S.batched_cdi(members, nonmembers, draw, procedure="crossfit")
    victim = int(draw.idx_p[0, 0])
    poisoned = members.clone()
    poisoned[victim] += 50.0
    after = S.batched_cdi(poisoned, nonmembers, draw, procedure="crossfit")
    fold = torch.cat([draw.fold_p[0], draw.fold_u[0]])
    sc0, sc1 = torch.cat([base["sP"][0], base["sU"][0]]), torch.cat([after["sP"][0], after["sU"][0]])
    same_fold = fold == fold[0]
    same_fold[0] = False
    torch.testing.assert_close(sc0[same_fold], sc1[same_fold])
    assert (sc0[fold != fold[0]] - sc1[fold != fold[0]]).abs().max() > 1e-3


@pytest.mark.parametrize("shift,n_p,n_u,procedure", [(0.3, 30, 30, "crossfit"), (0.0, 20, 40, "crossfit"), (0.15, 50, 25, "crossfit"),
                                                     (0.3, 30, 30, "split"), (0.3, 30, 30, "sequential"),
                                                     (0.3, 30, 30, "sequential_stratified"), (0.0, 20, 40, "crossfit_stratified"),
                                                     (0.3, 30, 30, "sequential_permutation"), (0.0, 50, 25, "sequential_permutation")])
def test_batched_cdi_matches_sklearn_loop(shift, n_p, n_u, procedure):
    rng = np.random.default_rng(0)
    members = torch.from_numpy(rng.normal(shift, 1, (120, 6)) * np.array([1, 2, 5, 1, 0.5, 1]) + np.array([0, 100, 0, -3, 0, 0]))
    nonmembers = torch.from_numpy(rng.normal(0, 1, (150, 6)) * np.array([1, 2, 5, 1, 0.5, 1]) + np.array([0, 100, 0, -3, 0, 0]))
    k = S.make_procedure(procedure).folds
    draw = S.draw_trials(120, 150, n_p, n_u, trials=12, k=k, seed=2)
    slow = S.loop_cdi(members, nonmembers, draw, tol=1e-8, procedure=procedure, seed=3)
    for solver in ("trial", "gather", "pool", "local"):  # every solver reaches the same optimum
        fast = S.batched_cdi(members, nonmembers, draw, procedure=procedure, solver=solver, seed=3)["p"].numpy()
        np.testing.assert_allclose(fast, slow, atol=1e-3, err_msg=solver)
        np.testing.assert_allclose(fast, slow, atol=1e-6, err_msg=solver)  # the exact optimum agrees far tighter


@pytest.mark.parametrize("procedure", ["sequential_stratified", "crossfit"])
def test_permutation_statistics_match_sklearn_loop(procedure):
    # The permutation test's relabelings (every row of P u U in every trial) give the loop's
    # p-values on the same splits.
    rng = np.random.default_rng(4)
    P, U = rng.normal(0.3, 1, (25, 5)) * [1, 3, 1, 1, 0.2], rng.normal(0, 1, (30, 5)) * [1, 3, 1, 1, 0.2]
    pool = torch.from_numpy(np.concatenate([P, U]))
    draw = S.permutation_draw(25, 30, 9, 5, seed=1)
    assert draw.idx_p[0].tolist() == list(range(25))  # trial 0: the observed labelling
    fast = S.batched_cdi(pool, pool[:0], draw, procedure=procedure)
    slow = S.loop_cdi(pool, pool[:0], draw, tol=1e-8, procedure=procedure)
    np.testing.assert_allclose(fast["p"].numpy(), slow, atol=1e-6)
    t = fast["t"]
    out = S.permutation_test(torch.from_numpy(P), torch.from_numpy(U), permutations=9, procedure=procedure, seed=1)
    assert out["p"] == pytest.approx((1 + int((t[1:] >= t[0]).sum())) / 10)


def test_pool_solver_weights_are_row_copies_with_labels():
    # Wt[r, i] copies of pool row i, W1[r, i] of them labelled 1: the same fit as sklearn on the
    # rows written out (a row may appear with both labels), standardisation included.
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(5)
    X = rng.normal(size=(40, 3)) * [1, 4, 0.5]
    Wt = rng.integers(0, 3, size=(3, 40)).astype(float)
    W1 = np.minimum(Wt, rng.integers(0, 2, size=(3, 40)) + (Wt == 2))
    beta, b0, mu, sc = S._pool_lr(torch.from_numpy(X), torch.from_numpy(W1).unsqueeze(1), torch.from_numpy(Wt).unsqueeze(1), C=0.5)
    for r in range(3):
        rows = np.repeat(np.arange(40), Wt[r].astype(int))
        y = np.concatenate([[1.0] * int(W1[r, i]) + [0.0] * int(Wt[r, i] - W1[r, i]) for i in range(40)])
        scaler = StandardScaler().fit(X[rows])
        lr = LogisticRegression(C=0.5, tol=1e-10, max_iter=10000).fit(scaler.transform(X[rows]), y)
        np.testing.assert_allclose(beta[r, 0].numpy(), lr.coef_[0], atol=1e-6)
        np.testing.assert_allclose(float(b0[r, 0]), lr.intercept_[0], atol=1e-6)
        np.testing.assert_allclose(sc[r, 0].numpy(), scaler.scale_, rtol=1e-10)


def test_pool_solver_exact_with_outliers_outside_a_fit():
    # A pool row far out (logits of thousands, where sigmoid underflows in float32 and
    # float64, for the fits that do not use it) leaves the fits at sklearn's optimum.
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(6)
    X = rng.normal(size=(60, 2))
    X[:30, 0] += 1.5
    X[59] = [2000.0, -2000.0]  # outlier, used by no fit
    Wt = np.ones((2, 60))
    Wt[:, 59] = 0
    Wt[1, :10] = 0
    W1 = Wt * (np.arange(60) < 30)
    beta, b0, _, _ = S._pool_lr(torch.from_numpy(X), torch.from_numpy(W1).unsqueeze(1), torch.from_numpy(Wt).unsqueeze(1), C=1.0)
    for r in range(2):
        rows = Wt[r] > 0
        scaler = StandardScaler().fit(X[rows])
        lr = LogisticRegression(C=1.0, tol=1e-10, max_iter=10000).fit(scaler.transform(X[rows]), W1[r][rows])
        np.testing.assert_allclose(beta[r, 0].numpy(), lr.coef_[0], atol=1e-6)
        np.testing.assert_allclose(float(b0[r, 0]), lr.intercept_[0], atol=1e-6)


def test_unbalanced_folds_are_refused():
    draw = S.draw_trials(30, 30, 10, 10, trials=3, k=5, seed=0)
    draw.fold_p[1, :4] = 0  # trial 1: at least 4 rows in fold 0, trial 0: 2
    with pytest.raises(ValueError, match="same number of rows in each fold"):
        S.batched_cdi(torch.randn(30, 3), torch.randn(30, 3), draw, procedure=S.DEFAULT_PROCEDURE)


def test_unknown_solver_is_refused():
    draw = S.draw_trials(20, 20, 10, 10, trials=1, seed=0)
    with pytest.raises(ValueError, match="unknown solver"):
        S.batched_cdi(torch.zeros(20, 2), torch.zeros(20, 2), draw, solver="bogus")


def test_draw_trials_disjoint_and_contaminated():
    draw = S.draw_trials(50, 80, 20, 30, trials=10, contamination=0.25, seed=0)
    for i in range(10):
        p, u = set(draw.idx_p[i].tolist()), set(draw.idx_u[i].tolist())
        assert len(p) == 20 and len(u) == 30 and not p & u
        assert sum(j >= 50 for j in p) == 5 and all(j >= 50 for j in u)
    with pytest.raises(ValueError, match="non-members"):
        S.draw_trials(50, 39, 20, 30, trials=1, contamination=0.5)


def test_curve_min_size_and_null_experiment():
    rng = np.random.default_rng(0)
    members = torch.from_numpy(rng.normal(0.4, 1, (400, 4)))
    nonmembers = torch.from_numpy(rng.normal(0, 1, (400, 4)))
    curve = S.pvalue_curve(members, nonmembers, [10, 50, 200], trials=200, progress=False)
    means = [r["mean_p"] for r in curve]
    assert means[0] > means[1] > means[2] and means[2] < 0.01
    assert S.min_suspect_size(curve) == 200
    null = S.null_experiment(nonmembers, 100, trials=300)
    assert null["false_positive_rate"] <= 0.03 and 0.3 < null["mean_p"] < 0.6


def test_pvalue_to_tpr_separated_runs():
    assert S.pvalue_to_tpr(torch.full((50,), 1e-5), torch.linspace(0.02, 1, 100)) == 1.0
    assert S.pvalue_to_tpr(torch.linspace(0.02, 1, 50), torch.full((100,), 1e-5)) == 0.0


def test_default_grid():
    assert S.default_size_grid(300) == [2, 3, 4, 5, 6, 7, 8, 9, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 200, 300]


def test_sequential_folds_never_score_with_a_model_that_saw_later_folds():
    proc = S.make_procedure("sequential_stratified", 5)
    assert proc.score[0] == -1  # fold 0 only fits
    for f in range(1, 5):
        assert max(proc.train[proc.score[f]]) < f  # fold f scored by a model of folds < f only


def test_unknown_procedure_is_one_line_error():
    from rsgm.errors import RSGMError

    with pytest.raises(RSGMError, match="unknown CDI procedure"):
        S.make_procedure("bogus")


def _null_features(n=1200, d=8, seed=0):
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.exp(0.5 * rng.standard_t(4, (n, d)) @ rng.normal(size=(d, d)) / np.sqrt(d)))


def test_default_procedure_null_calibration_fast():
    # Heavy-tailed, correlated null features: the default keeps its size at alpha = 0.05.
    F = _null_features()
    for n_p in (10, 40):
        null = S.null_experiment(F, n_p, trials=300, alpha=0.05, seed=n_p)
        check = S.null_check(null["p_values"], 0.05)
        assert check["passed"], check


def test_null_check_binomial_bound():
    # P(X <= 16) = 0.973 < 0.975 <= P(X <= 17) = 0.986 for X ~ Bin(1000, 0.01)
    assert S.binomial_upper(1000, 0.01) == 17 and S.binomial_upper(1000, 0.05) == 64
    assert S.null_check(torch.linspace(0.001, 1, 1000), 0.01)["passed"]
    assert not S.null_check(torch.cat([torch.full((30,), 1e-4), torch.rand(970)]), 0.01)["passed"]


def test_permutation_pvalue_exact_and_finds_shift():
    rng = np.random.default_rng(3)
    P, U = torch.from_numpy(rng.normal(1.0, 1, (20, 3))), torch.from_numpy(rng.normal(0, 1, (20, 3)))
    out = S.permutation_test(P, U, permutations=99, procedure="split", seed=0)
    assert out["p"] == pytest.approx(0.01)  # the observed statistic beats every relabeling
    # Under the null, p = (1 + #exceed) / (1 + B) is uniform on {1/20, ..., 1}: P(p <= 0.1) <= 0.1.
    F = _null_features(400, 3, seed=5)
    ps = [S.permutation_test(F[i * 20:(i + 1) * 20], F[200 + i * 10:200 + (i + 1) * 10], permutations=19, procedure="split", seed=i)["p"]
          for i in range(20)]
    assert all(p in {(1 + j) / 20 for j in range(20)} for p in ps)
    assert sum(p <= 0.1 for p in ps) <= 6


@pytest.mark.slow
@pytest.mark.parametrize("n_p", [10, 30, 100, 300])
def test_default_procedure_null_calibration_1000_trials(n_p):
    F = _null_features(2 * 300 + 10, 26, seed=11)
    null = S.null_experiment(F, n_p, trials=1000, alpha=0.01, seed=n_p)
    for alpha in (0.01, 0.05):
        assert S.null_check(null["p_values"], alpha)["passed"]


@pytest.mark.slow
def test_thesis_crossfit_is_over_dispersed_and_default_is_not():
    # The cause of the over-dispersion: the fold models of cross-fitting are fitted on each
    # other's test folds; the forward-chained default is not, on the same data.
    F = _null_features(1000, 26, seed=12)
    thesis = S.null_experiment(F, 30, trials=1000, alpha=0.05, procedure="crossfit", seed=1)
    default = S.null_experiment(F, 30, trials=1000, alpha=0.05, seed=1)
    assert not S.null_check(thesis["p_values"], 0.05)["passed"]
    assert S.null_check(default["p_values"], 0.05)["passed"]


def test_trial_solver_is_sklearns_optimum_and_hands_unconverged_trials_on(monkeypatch):
    # Every model of the trial solver is sklearn's StandardScaler + LogisticRegression: scores
    # of held-out rows to 1e-6 on a design with offsets, scales and a column that is constant
    # inside a trial's folds; trials the MM iteration leaves unconverged are solved again.
    rng = np.random.default_rng(7)
    F = rng.normal(0, 1, (300, 5)) * np.array([1, 30, 0.01, 1, 1]) + np.array([0, 500, 0, 2, 0])
    F[:, 4] = 3.0  # constant: StandardScaler's scale 1
    F, proc = torch.from_numpy(F), S.make_procedure("sequential_stratified")
    draw = S.draw_trials(150, 150, 60, 60, trials=6, k=5, seed=1)
    scores, by_fold = S._fit_and_score_trial(F, draw, proc, 0.7)
    fold = torch.cat([draw.fold_p, draw.fold_u], 1)
    torch.testing.assert_close(by_fold, S._by_fold(scores, fold), equal_nan=True)
    Fn = F.numpy()
    for i in range(6):
        idx = np.r_[draw.idx_p[i].numpy(), draw.idx_u[i].numpy()]
        y, f = np.r_[np.ones(60), np.zeros(60)], fold[i].numpy()
        for j, fs in enumerate(proc.train):
            tr, te = np.isin(f, fs), f == j + 1
            ref = S.sklearn_fit_score(Fn[idx[tr]], y[tr], Fn[idx[te]], C=0.7, tol=1e-10)
            np.testing.assert_allclose(scores[i, te].numpy(), ref, atol=1e-6)
    orig = S._trial_lr
    monkeypatch.setattr(S, "_trial_lr", lambda *a, **k: orig(*a, **{**k, "max_iter": 2}))
    again = S._fit_and_score_trial(F, draw, proc, 0.7)[0]  # two MM steps: nothing converged, all re-solved
    torch.testing.assert_close(again, scores, atol=1e-6, rtol=0, equal_nan=True)


def test_fold_permutation_pvalue_is_uniform_and_needs_the_random_layout():
    # A 2 + 2 fold (6 labellings) under H0: with the scores laid out on a random labelling the
    # randomised p is uniform; laying every trial out on labelling 0 instead (P always on the
    # same positions of the shared relabelings) skews it by how often the relabelings repeat
    # labelling 0 (here 134 of 1000 instead of about 167).
    g = torch.Generator().manual_seed(0)
    T = 60000
    a, b = torch.randn(T, 2, generator=g, dtype=torch.float64), torch.randn(T, 2, generator=g, dtype=torch.float64)
    E, place = S.fold_relabelings(2, 2, 999, 39)
    same = int((E == E[:, :1]).all(0).sum())
    assert same == 134  # the draw the negative check below relies on
    c, u = torch.randint(0, 1000, (T,), generator=g), torch.rand(T, generator=g, dtype=torch.float64)
    grid = torch.linspace(0.02, 0.98, 49, dtype=torch.float64)
    sd = (grid * (1 - grid) / T).sqrt()
    p = S.fold_permutation_pvalue(a, b, E, place, c, u)
    assert ((p.unsqueeze(1) <= grid).double().mean(0) - grid).abs().max() < 4 * sd.max()
    fixed = S.fold_permutation_pvalue(a, b, E, place, torch.zeros_like(c), u)
    assert ((fixed.unsqueeze(1) <= grid).double().mean(0) - grid).abs().max() > 8 * sd.max()


def test_fold_permutation_pvalue_hand_case():
    # One P score 3.0 and U scores 1.0, 2.0: the sums over the 3 labellings are 3, 1, 2. With the
    # labellings (P at position 0, 1, 2) repeated [2, 1, 1] times and the observed laid out on a
    # position-0 copy, one other copy ties and none is larger: p = u (1 + 1) / 4.
    E = torch.tensor([[1.0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.float64)
    place = torch.tensor([[0, 1, 2], [0, 1, 2], [1, 0, 2], [2, 0, 1]])
    p = S.fold_permutation_pvalue(torch.tensor([[3.0]]), torch.tensor([[1.0, 2.0]]), E, place, torch.tensor([1]), torch.tensor([0.3]))
    assert float(p) == pytest.approx(0.3 * 2 / 4)
    # The observed 1.0 (P on the U-sized score): sums 2 and 3 lie above (3 labellings of 4), no tie.
    p = S.fold_permutation_pvalue(torch.tensor([[1.0]]), torch.tensor([[3.0, 2.0]]), E, place, torch.tensor([2]), torch.tensor([0.5]))
    assert float(p) == pytest.approx((3 + 0.5) / 4)


def test_permutation_default_is_reproducible_and_stouffer():
    # Same seed, same p-values; the default's p is Phi(-sum_f z_f / 2) over its 4 scored folds.
    rng = np.random.default_rng(2)
    P, U = torch.from_numpy(rng.normal(0.4, 1, (40, 3))), torch.from_numpy(rng.normal(0, 1, (60, 3)))
    one, two = S.audit_test(P, U, seed=5), S.audit_test(P, U, seed=5)
    assert one == two and one["procedure"] == S.DEFAULT_PROCEDURE == "sequential_permutation"
    assert one["p"] == pytest.approx(float(sps.norm.sf(one["t"])), rel=1e-9)
    assert S.audit_test(P, U, seed=6)["p"] != one["p"]


def test_trial_solver_chunks_and_threads_give_the_same_p_values(monkeypatch):
    # The trial solver's chunks reuse per-thread buffers: many small chunks over two worker
    # threads must give the p-values of one chunk on one thread (the statistic then runs on
    # two shares of the trials, relabelings included); rows_used counts distinct rows.
    rng = np.random.default_rng(11)
    members, nonmembers = torch.from_numpy(rng.normal(0.1, 1, (150, 6))), torch.from_numpy(rng.normal(0, 1, (150, 6)))
    draw = S.draw_trials(150, 150, 40, 40, trials=24, k=5, seed=4)
    assert S.rows_used(draw, 300) == int(torch.unique(torch.cat([draw.idx_p, draw.idx_u], 1)).numel())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = {proc: S.batched_cdi(members, nonmembers, draw, solver="trial", procedure=proc)["p"] for proc in ("sequential_stratified", S.DEFAULT_PROCEDURE)}
        monkeypatch.setattr(S, "TRIAL_CHUNK_ELEMENTS", 1)  # one trial per chunk
        torch.set_num_threads(2)
        many = {proc: S.batched_cdi(members, nonmembers, draw, solver="trial", procedure=proc)["p"] for proc in one}
    finally:
        torch.set_num_threads(threads)
    for proc in one:  # each chunk stops when its own steps are below TRIAL_TOL
        torch.testing.assert_close(many[proc], one[proc], atol=1e-7, rtol=0, msg=proc)


def test_worker_threads_under_inference_mode(monkeypatch):
    # Lightning runs `rsgm test` callbacks under torch.inference_mode, which worker threads do
    # not share: the chunks' outputs must still be writable from them.
    rng = np.random.default_rng(12)
    members, nonmembers = torch.from_numpy(rng.normal(0.1, 1, (100, 4))), torch.from_numpy(rng.normal(0, 1, (100, 4)))
    draw = S.draw_trials(100, 100, 20, 20, trials=6, k=5, seed=1)
    monkeypatch.setattr(S, "TRIAL_CHUNK_ELEMENTS", 1)  # one trial per chunk: the worker threads run
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        plain = S.batched_cdi(members, nonmembers, draw)["p"]
        with torch.inference_mode():
            inside = S.batched_cdi(members, nonmembers, draw)["p"]
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(inside, plain, atol=0, rtol=0)


def test_keep_freed_memory_is_glibc_only_and_can_be_switched_off(monkeypatch):
    import platform

    monkeypatch.setenv("RSGM_KEEP_FREED_MEMORY", "0")
    assert S.keep_freed_memory.__wrapped__() is False
    monkeypatch.delenv("RSGM_KEEP_FREED_MEMORY")
    assert S.keep_freed_memory.__wrapped__() is (platform.libc_ver()[0] == "glibc")
