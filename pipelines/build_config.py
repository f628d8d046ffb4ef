"""The build configuration: its flags, and its copy in the lake that later runs reuse.

Why the lake keeps it: the daily refresh reruns ``build_sequences`` on a lake it did not build.
With only its own defaults it would rebuild a lake made with ``--context-top-k 5`` or
``--min-history 2`` as if made with 3 and 1, rewriting every example silently. So every build
stores the configuration it ran with under ``<lake>/_meta/build_config`` (beside the split
cutoffs and the subject coverage), and the refresh starts from that copy; a flag given to the
refresh still wins and is printed. The trainer reads the same copy (with ``deltalake``) to
record the context top-k in the bundle manifest, which the resolver then applies.

Stored: every field except the explicit split cutoffs, which have their own table
(``pipelines/sequences.py``, reused by every later build). The row holds the fields as JSON
(``ctt_contracts.BUILD_CONFIG_JSON``), so adding a field needs no schema change and an older
copy without it reads with the field's default.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import ctt_contracts as C
from ctt_contracts.flags import add_dataclass_flags, described, given_fields
from pipelines.sequences import DEFAULT_MAX_LEN, SplitCutoffs
from pipelines.subjects import DEFAULT_WINDOW_MINUTES, DERIVE_MODES, DERIVE_NONE
from pipelines.validate import DEFAULT_MAX_QUARANTINE_FRAC

NOT_STORED = ("val_start", "test_start")  # the split cutoffs: stored in their own table


def timestamp_arg(text: Union[str, datetime]) -> datetime:
    """ISO-8601 date/time or epoch seconds, or a datetime (a default, or a value already read);
    naive values are UTC."""
    if isinstance(text, datetime):
        return C.as_utc(text)
    if not isinstance(text, str):
        raise argparse.ArgumentTypeError(f"not an ISO timestamp or epoch seconds: {text!r}")
    try:
        ts = (datetime.fromtimestamp(float(text), tz=timezone.utc)
              if text.replace(".", "", 1).isdigit() else datetime.fromisoformat(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"not an ISO timestamp or epoch seconds: {text!r}") from err
    return C.as_utc(ts)


@dataclass(frozen=True)
class BuildConfig:
    """The build's settings; each field is a flag of build_sequences and of the refresh
    (``ctt_contracts.flags``: ``--max-len`` for ``max_len``, this default, this help)."""

    max_len: int = field(default=DEFAULT_MAX_LEN, metadata=described(
        "history cap: newest N conversions kept"))
    min_history: int = field(default=1, metadata=described(
        "minimum earlier conversions for a training example; 0 also keeps first conversions, "
        "served from the cold-start state and the context"))
    val_start: Optional[datetime] = field(default=None, metadata=described(
        "first label time of the validation split (ISO or epoch s, UTC); with --test-start. "
        "Default: stored cutoffs, else derived once from quantiles", parse=timestamp_arg))
    test_start: Optional[datetime] = field(default=None, metadata=described(
        "first label time of the test split", parse=timestamp_arg))
    val_frac: float = field(default=0.1, metadata=described(
        "fraction of conversions (by time) for validation when deriving cutoffs"))
    test_frac: float = field(default=0.1, metadata=described(
        "fraction of conversions (by time) for test when deriving cutoffs"))
    context_top_k: int = field(default=C.DEFAULT_CONTEXT_TOP_K, metadata=described(
        "categories per context row"))
    derive_subject: str = field(default=DERIVE_NONE, metadata=described(
        "subject item of conversions that logged none, from the user's browsing (views/clicks "
        "at or before the conversion, in its session, else within --subject-window-minutes): "
        "last_view = the last viewed item (often the converted item itself), last_other_view = "
        "the last viewed item other than the converted one; a logged subject always wins",
        choices=DERIVE_MODES))
    subject_window_minutes: int = field(default=DEFAULT_WINDOW_MINUTES, metadata=described(
        "how far back a view may be for conversions without a session id"))
    max_quarantine_frac: float = field(default=DEFAULT_MAX_QUARANTINE_FRAC, metadata=described(
        "stop before writing when more than this share of a raw table would be quarantined, "
        "with the top reasons; 1 = never stop"))

    def __post_init__(self) -> None:
        if self.derive_subject not in DERIVE_MODES:
            raise ValueError(f"derive_subject must be one of {DERIVE_MODES}, "
                             f"got {self.derive_subject!r}")
        if self.subject_window_minutes <= 0:
            raise ValueError(f"subject window must be > 0 minutes, "
                             f"got {self.subject_window_minutes}")
        if not 0 <= self.max_quarantine_frac <= 1:
            raise ValueError(f"max_quarantine_frac must be within [0, 1], "
                             f"got {self.max_quarantine_frac}")
        if self.context_top_k < 1:
            raise ValueError(f"context_top_k must be >= 1, got {self.context_top_k}")

    def explicit_cutoffs(self) -> Optional[SplitCutoffs]:
        if (self.val_start is None) != (self.test_start is None):
            raise ValueError("give both --val-start and --test-start, or neither")
        if self.val_start is None:
            return None
        return SplitCutoffs(self.val_start, self.test_start, origin="explicit")

    def stored_fields(self) -> Dict[str, Any]:
        """The fields the lake keeps (everything but the explicit cutoffs)."""
        return {k: v for k, v in asdict(self).items() if k not in NOT_STORED}


def from_stored(values: Mapping[str, Any]) -> BuildConfig:
    """A stored copy -> BuildConfig; keys this version does not know are refused (a newer
    writer), keys it lacks take their defaults (an older writer)."""
    known = {f.name for f in fields(BuildConfig)} - set(NOT_STORED)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"stored build config has fields this version does not know: {unknown}")
    return BuildConfig(**dict(values))


# --------------------------------------------------------------------------------------
# The stored copy (Spark: works on any lake URI, like the split cutoffs)
# --------------------------------------------------------------------------------------
def build_config_path(lake: str) -> str:
    return C.LakePaths(lake).meta(C.META_BUILD_CONFIG)


def load_build_config(spark, lake: str) -> Optional[BuildConfig]:
    """The configuration the lake's last build ran with (None: built before it was stored)."""
    from pipelines.delta_io import load_record

    row = load_record(spark, build_config_path(lake))
    return None if row is None else from_stored(json.loads(row[C.BUILD_CONFIG_JSON]))


def store_build_config(spark, lake: str, cfg: BuildConfig, now: datetime) -> bool:
    """Replace the stored copy when it changed (True when written): reruns commit nothing."""
    from pipelines.delta_io import store_json_record

    stored = load_build_config(spark, lake)
    if stored is not None and stored.stored_fields() == cfg.stored_fields():
        return False
    store_json_record(spark, build_config_path(lake), C.BUILD_CONFIG_JSON,
                      json.dumps(cfg.stored_fields(), sort_keys=True), now)
    return True


def with_overrides(stored: Optional[BuildConfig],
                   overrides: Mapping[str, Any]) -> Tuple[BuildConfig, str]:
    """The configuration a rerun uses: the stored copy (else the defaults) with the given
    fields replaced; plus one line saying where each part came from."""
    base = stored if stored is not None else BuildConfig()
    cfg = replace(base, **dict(overrides))
    origin = ("the lake's stored build config" if stored is not None
              else "defaults (the lake stores no build config: built before it was stored)")
    given = ", ".join(f"{k}={v}" for k, v in sorted(overrides.items()))
    return cfg, f"build config: {origin}" + (f"; overridden by flags: {given}" if given else "")


# --------------------------------------------------------------------------------------
# Flags (build_sequences declares them with defaults; the refresh without, as overrides)
# --------------------------------------------------------------------------------------
def add_build_flags(p: argparse.ArgumentParser, overrides: bool = False) -> None:
    """The BuildConfig flags. ``overrides``: no defaults (None = keep the lake's stored value)."""
    add_dataclass_flags(p, BuildConfig, overrides=overrides,
                        overrides_default="default: the lake's stored value")


def flag_values(args: argparse.Namespace) -> Dict[str, Any]:
    """The BuildConfig fields given on the command line (None = not given)."""
    return given_fields(BuildConfig, args)
