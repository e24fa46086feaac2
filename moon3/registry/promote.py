"""The promotion gate (challenger vs ``champion``), promotion and rollback of the ``champion`` alias.

Gate rules (``params.yaml`` section ``promotion``):

* **Absolute minimums** (``min_values``): the challenger's value must be >= the floor. A first model (no champion
  yet) is promoted only when it passes these.
* **Regression vs champion** (``max_regression``): ``delta = challenger - champion``. Per-query outcomes are not
  kept in the registry, so the 95% interval of the delta is a normal approximation from the two recorded values
  and their item counts (the sibling ``n`` key in metrics.json): ``se = sqrt(a(1-a)/n_a + b(1-b)/n_b)``. For a
  mean of per-item values in [0, 1] (recall, accuracy, MRR) ``m(1-m)`` bounds the per-item variance, so the
  interval is conservative. A regression counts only when the whole interval lies below ``-limit`` (``hi <
  -limit``); a metric with no ``n`` (a summary) is compared as a point value (``delta < -limit``).
* **Reasoning rule** (``reasoning_metrics``, ``reasoning_margin``): the challenger's own evaluation recorded a
  paired bootstrap interval of ``reasoning_off - trained`` (metrics.json ``deltas.reasoning_off``, see
  ``moon3.eval.compare``); it fails when that interval lies entirely above the margin (``lo > margin``). A model
  without a reasoning_off evaluation (never trained on traces) gets ``n/a``.

Concurrency: a promotion or rollback holds a lock, the registered model ``<name>-promotion-lock``. MLflow
creates a registered model atomically (unique name in the backend store; a second create fails with
``RESOURCE_ALREADY_EXISTS``), so exactly one process holds it. Under the lock the ``champion`` alias is
re-read and compared with the version the gate ran against (compare-and-set): if another promotion moved it
in between, this one stops with :class:`PromotionConflict` and changes nothing. A lock older than
``lock_timeout_s`` (a crashed holder) is broken by the next caller (renamed away, atomically, then deleted).

History: the registered model's tag ``champion_history`` is the stack of champion versions (comma-separated,
oldest first); ``champion_events`` is an append-only JSON log of promotions and rollbacks. Versions carry
``promoted_at`` / ``previous_champion`` and ``rolled_back_at`` tags.
"""

from __future__ import annotations

import json
import math
import os
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moon3.model.contract import CODE_OWNED_FIELDS, ContractError, EmbeddingContract
from moon3.registry.register import CHALLENGER, CHAMPION, CONTRACT_ARTIFACT, METRICS_ARTIFACT

PASS, FAIL, NA = "pass", "FAIL", "n/a"
Z95 = 1.959964
# Contract fields the serving configuration fixes besides the code-owned ones: a served model and its index
# (built with the config's model section) must agree on them.
SERVING_FIELDS = ("embed_dim", "image_size", "image_min_pixels", "image_max_pixels", "max_trace_tokens")
_EVENTS_MAX_CHARS = 4500


class PromotionError(RuntimeError):
    """The promotion or rollback cannot go ahead (nothing was changed)."""


class GateFailed(PromotionError):
    """The challenger failed the gate; ``rows`` is the table, ``version`` / ``champion`` the two versions."""

    def __init__(self, rows: list[GateRow], version: str = "", champion: str | None = None) -> None:
        super().__init__("the challenger failed the promotion gate:\n" + format_table(rows))
        self.rows, self.version, self.champion = rows, version, champion


class PromotionConflict(PromotionError):
    """Another promotion or rollback holds the lock or moved ``champion`` first."""


@dataclass
class GateRow:
    """One line of the gate table."""

    rule: str
    metric: str
    champion: float | None
    challenger: float | None
    limit: str
    verdict: str

    def to_dict(self) -> dict[str, Any]:
        """Plain dict."""
        return dict(self.__dict__)


def _get(metrics: dict[str, Any], key: str) -> Any:
    node: Any = metrics
    for part in key.split("/"):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _count(metrics: dict[str, Any], key: str) -> float | None:
    parent = key.rsplit("/", 1)[0]
    n = _num(_get(metrics, f"{parent}/n"))
    return n if n and n > 0 else None


def regression_interval(
    champion: float, challenger: float, n_champion: float | None, n_challenger: float | None
) -> tuple[float, float, float]:
    """``(delta, lo, hi)`` of ``challenger - champion``: normal 95% interval (module docstring), point if no n."""
    delta = challenger - champion
    if not n_champion or not n_challenger:
        return delta, delta, delta

    def var(m: float, n: float) -> float:
        m = min(max(m, 0.0), 1.0)
        return m * (1.0 - m) / n

    se = math.sqrt(var(champion, n_champion) + var(challenger, n_challenger))
    return delta, delta - Z95 * se, delta + Z95 * se


def evaluate_gate(challenger: dict[str, Any], champion: dict[str, Any] | None, pcfg: Any) -> list[GateRow]:
    """The gate table for metrics.json dicts ``challenger`` and ``champion`` (None: no champion yet)."""
    rows = []
    for key, floor in pcfg.min_values.items():
        value = _num(_get(challenger, key))
        old = _num(_get(champion, key)) if champion else None
        ok = value is not None and value >= floor
        rows.append(GateRow("minimum", key, old, value, f">= {floor:g}", PASS if ok else FAIL))
    if champion is not None:
        for key, limit in pcfg.max_regression.items():
            value, old = _num(_get(challenger, key)), _num(_get(champion, key))
            if value is None or old is None:
                verdict = FAIL if value is None else NA  # a metric the challenger lacks cannot pass
                rows.append(GateRow("regression", key, old, value, f"drop <= {limit:g}", verdict))
                continue
            delta, lo, hi = regression_interval(old, value, _count(champion, key), _count(challenger, key))
            verdict = FAIL if hi < -limit else PASS
            rows.append(
                GateRow(
                    "regression", key, old, value, f"drop <= {limit:g} (d {delta:+.3f} [{lo:+.3f}, {hi:+.3f}])", verdict
                )
            )
    off = _get(challenger, "deltas/reasoning_off")
    for key in pcfg.reasoning_metrics:
        task, _, metric = key.rpartition("/")
        entry = (off or {}).get(task, {}).get(metric) if isinstance(off, dict) else None
        name = f"reasoning_off - trained: {key}"
        if not entry:
            rows.append(GateRow("reasoning", name, None, None, "no reasoning_off evaluation", NA))
            continue
        lo, hi, delta = float(entry["lo"]), float(entry["hi"]), float(entry["delta"])
        verdict = FAIL if lo > pcfg.reasoning_margin else PASS
        limit = f"<= {pcfg.reasoning_margin:g} ([{lo:+.3f}, {hi:+.3f}])"
        rows.append(GateRow("reasoning", name, None, delta, limit, verdict))
    return rows


def passed(rows: list[GateRow]) -> bool:
    """No row failed."""
    return all(r.verdict != FAIL for r in rows)


def format_table(rows: list[GateRow]) -> str:
    """Markdown table: metric, champion, challenger, limit, verdict (what CI posts on the pull request)."""

    def cell(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"

    lines = ["| metric | champion | challenger | limit | verdict |", "|---|---|---|---|---|"]
    lines += [f"| {r.metric} | {cell(r.champion)} | {cell(r.challenger)} | {r.limit} | {r.verdict} |" for r in rows]
    return "\n".join(lines)


def check_serving_contract(contract: EmbeddingContract, cfg: Any) -> None:
    """Refuse a contract the serving configuration cannot serve.

    The expected contract is this code's (``CODE_OWNED_FIELDS``) with the fields of ``cfg.model`` that the
    server and its index depend on (:data:`SERVING_FIELDS`); ``reasoning`` / ``trained_with_traces`` come from
    training and may differ.

    Raises:
        ContractError: naming every field that differs.
    """
    expected = EmbeddingContract.from_model_config(cfg.model)
    bad = {k: v for k, v in contract.diff(expected).items() if k in CODE_OWNED_FIELDS + SERVING_FIELDS}
    if bad:
        detail = "; ".join(f"{k}: model {a!r}, serving config {b!r}" for k, (a, b) in sorted(bad.items()))
        raise ContractError(f"challenger contract does not match the serving configuration ({detail})")


# --- registry access ------------------------------------------------------------------------------------------
def _aliases(client: Any, name: str) -> dict[str, str]:
    return {k: str(v) for k, v in (client.get_registered_model(name).aliases or {}).items()}


def _artifact_json(client: Any, version: Any, path: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        local = client.download_artifacts(version.run_id, path, tmp)
        return json.loads(Path(local).read_text())


def version_metrics(client: Any, name: str, version: str) -> dict[str, Any]:
    """The metrics.json registered with ``name`` version ``version``."""
    return _artifact_json(client, client.get_model_version(name, version), METRICS_ARTIFACT)


def version_contract(client: Any, name: str, version: str) -> EmbeddingContract:
    """The contract registered with ``name`` version ``version``."""
    payload = _artifact_json(client, client.get_model_version(name, version), CONTRACT_ARTIFACT)
    return EmbeddingContract(**payload["contract"])


def _rm_tags(client: Any, name: str) -> dict[str, str]:
    return dict(client.get_registered_model(name).tags or {})


def _history(client: Any, name: str) -> list[str]:
    raw = _rm_tags(client, name).get("champion_history", "")
    return [v for v in raw.split(",") if v]


def _log_event(client: Any, name: str, event: dict[str, Any]) -> None:
    events = json.loads(_rm_tags(client, name).get("champion_events", "[]"))
    events.append(event)
    while len(json.dumps(events)) > _EVENTS_MAX_CHARS and len(events) > 1:
        events.pop(0)  # the full history stays in champion_history and the version tags
    client.set_registered_model_tag(name, "champion_events", json.dumps(events, separators=(",", ":")))


class RegistryLock:
    """Mutual exclusion across processes: the registered model ``<name>-promotion-lock`` (atomic create)."""

    def __init__(self, client: Any, name: str, timeout_s: float, what: str) -> None:
        self.client, self.name, self.timeout_s, self.what = client, f"{name}-promotion-lock", timeout_s, what
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    def _create(self) -> bool:
        from mlflow.exceptions import MlflowException

        tags = {"holder": self.token, "acquired_at": f"{time.time():.3f}", "operation": self.what}
        try:
            self.client.create_registered_model(self.name, tags=tags)
            return True
        except MlflowException as err:
            if "RESOURCE_ALREADY_EXISTS" in str(err.error_code) or "already exists" in str(err).lower():
                return False
            raise

    def __enter__(self) -> RegistryLock:
        if self._create():
            return self
        from mlflow.exceptions import MlflowException

        try:
            tags = dict(self.client.get_registered_model(self.name).tags or {})
        except MlflowException:  # released in between: one more try
            tags = {}
        age = time.time() - float(tags.get("acquired_at", time.time()))
        if tags and age > self.timeout_s:
            # Break it by an atomic rename (only one breaker succeeds), then take the lock like anyone else.
            stale = f"{self.name}-stale-{uuid.uuid4().hex[:8]}"
            try:
                self.client.rename_registered_model(self.name, stale)
                self.client.delete_registered_model(stale)
            except MlflowException:
                pass  # another caller broke or released it first
            if self._create():
                return self
        raise PromotionConflict(
            f"another promotion/rollback holds the registry lock {self.name} "
            f"({tags.get('operation', '?')} by {tags.get('holder', '?')}, {age:.0f} s ago); nothing was changed"
        )

    def __exit__(self, *exc: Any) -> None:
        self.client.delete_registered_model(self.name)


def _acquire_lock(client: Any, name: str, timeout_s: float, what: str) -> RegistryLock:
    return RegistryLock(client, name, timeout_s, what).__enter__()


@dataclass
class PromotionResult:
    """What :func:`promote` did."""

    version: str
    previous: str | None
    rows: list[GateRow]
    promoted: bool


def promote(cfg: Any, client: Any, version: str | None = None, dry_run: bool = False) -> PromotionResult:
    """Gate ``version`` (default: the ``challenger`` alias) against ``champion``; on pass move ``champion``.

    ``dry_run`` runs the contract check and the gate only (what CI does on a pull request): nothing moves.

    Raises:
        ContractError: the challenger's contract does not match the serving configuration.
        GateFailed: a gate rule failed (the table is in the message and ``rows``).
        PromotionConflict: another promotion holds the lock or moved ``champion`` after this gate read it.
        PromotionError: no challenger.
    """
    pcfg = cfg.promotion
    name = pcfg.model_name
    aliases = _aliases(client, name)
    version = str(version or aliases.get(CHALLENGER) or "")
    if not version:
        raise PromotionError(f"{name}: no version given and no '{CHALLENGER}' alias (run `moon3 register` first)")
    check_serving_contract(version_contract(client, name, version), cfg)
    expected = aliases.get(CHAMPION)
    if expected == version:
        return PromotionResult(version, expected, [], False)
    champion_metrics = version_metrics(client, name, expected) if expected else None
    rows = evaluate_gate(version_metrics(client, name, version), champion_metrics, pcfg)
    if not passed(rows):
        raise GateFailed(rows, version, expected)
    if dry_run:
        return PromotionResult(version, expected, rows, False)
    lock = _acquire_lock(client, name, pcfg.lock_timeout_s, f"promote v{version}")
    try:
        current = _aliases(client, name).get(CHAMPION)
        if current != expected:
            raise PromotionConflict(
                f"{name}: '{CHAMPION}' moved from v{expected} to v{current} while v{version} was being gated; "
                "nothing was changed: re-run the gate against the new champion"
            )
        now = f"{time.time():.3f}"
        client.set_registered_model_alias(name, CHAMPION, version)
        client.set_model_version_tag(name, version, "promoted_at", now)
        client.set_model_version_tag(name, version, "previous_champion", expected or "")
        history = _history(client, name) + [version]
        client.set_registered_model_tag(name, "champion_history", ",".join(history))
        _log_event(client, name, {"action": "promote", "from": expected, "to": version, "at": now})
    finally:
        lock.__exit__(None, None, None)
    return PromotionResult(version, expected, rows, True)


def rollback(cfg: Any, client: Any, to_version: str | None = None) -> tuple[str, str]:
    """Move ``champion`` back to the previous champion (or ``to_version``, a former champion).

    Returns:
        ``(from_version, to_version)``.

    Raises:
        PromotionError: no champion, or no earlier champion to go back to.
        PromotionConflict: another promotion/rollback holds the lock.
    """
    pcfg = cfg.promotion
    name = pcfg.model_name
    with RegistryLock(client, name, pcfg.lock_timeout_s, "rollback"):
        current = _aliases(client, name).get(CHAMPION)
        history = _history(client, name)
        if not current:
            raise PromotionError(f"{name}: no '{CHAMPION}' to roll back")
        if history and history[-1] == current:
            history.pop()
        if to_version is not None:
            if str(to_version) not in history:
                raise PromotionError(f"{name}: v{to_version} was never champion before v{current} (history {history})")
            while history and history[-1] != str(to_version):
                history.pop()
        if not history:
            raise PromotionError(f"{name}: v{current} is the first champion; there is nothing to roll back to")
        target = history[-1]
        now = f"{time.time():.3f}"
        client.set_registered_model_alias(name, CHAMPION, target)
        client.set_model_version_tag(name, current, "rolled_back_at", now)
        client.set_registered_model_tag(name, "champion_history", ",".join(history))
        _log_event(client, name, {"action": "rollback", "from": current, "to": target, "at": now})
    return current, target
