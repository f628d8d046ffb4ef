"""Feast definitions of the contextual two-tower: entities, sources, views, the service.

Plain declarations only (imported by ``feast apply``): it imports the contracts and Feast and
nothing else of the project, touches no file, and reads one thing, the lake root whose Parquet
snapshots the offline sources point at (``CTT_LAKE``). Without it the import fails and says
what to export: a source silently pointed at some default folder would apply, then materialize
nothing (or another lake's rows). Every name comes from ctt_contracts.

Views (all keyed by the contract's ids):
- ``user_sequence_state`` (user): the encoder's cached last hidden state(s) written by batch
  inference, the ``model_version`` that produced it (the resolver refuses a state from another
  checkpoint: seed 003 "version skew") and the ``sequence_hash`` it encodes; event time =
  ``state_ts``, which the resolver returns as the state's age ("refresh staleness").
- ``user_profile`` (user): demographics (age_bucket, country, gender) for the online head.
- ``item_categories`` (item): a subject item's categories + confidence weights, turned into the
  real-time context online.
No TTL (``ttl=0``): a stale state must reach the resolver and be reported with its age, not be
silently dropped by the store (which would turn the user into an unexplained cold start).

Offline source: Parquet snapshots of the Delta tables. Options checked against the INSTALLED
Feast 0.67 (read in feast/infra/offline_stores, then run from the CLI):
(a) ``SparkSource(path=..., table_format=DeltaFormat())`` + ``offline_store: spark``: reads
    Delta correctly (``spark.read.format("delta")``), but every ``feast apply`` (source
    validation) and ``feast materialize`` starts a JVM with the Delta jars configured in
    ``spark_conf``; measured on this 2-core machine (shared, load ~8): apply 76 s,
    materialize of 3 rows 200 s. The API also warns it is alpha.
(b) ``FileSource(file_format=DeltaFormat())`` + the file (dask) store: only the schema is read
    with deltalake; the rows are read by ``dask.read_parquet`` over the folder, which includes
    files that Delta removed. Reproduced: after ``DELETE user_id = 3`` the deleted user is still
    materialized and served (likewise after an overwrite both versions' rows are read). Wrong
    answers, silently. (The duckdb store would read Delta via ibis, which is not installed.)
(c) Parquet snapshots written from the Delta tables with deltalake (Delta-aware, no JVM) by
    ``pipelines/feast_ops.py:export_feature_tables``: one folder of Parquet parts per view,
    each part written atomically and carrying the Delta version it came from (user_states
    gains one part of changed states per refresh); ``feast materialize`` runs in seconds with
    no JVM.
Chosen: (c). The price is one export step, which jobs/batch_inference.py runs after every MERGE
(and ``ctt-export-feature-tables --lake LAKE`` runs it alone). The users/items tables have no event
timestamp, so their snapshots add ``feature_ts`` (kept unchanged for unchanged rows, so
``materialize-incremental`` only re-sends what changed).
"""
import os
from datetime import timedelta

from feast import Entity, FeatureService, FeatureView, Field, FileSource, ValueType
from feast.data_format import ParquetFormat
from feast.types import Array, Float32, Int64, String

import ctt_contracts as C


def _lake_root() -> str:
    lake = os.environ.get(C.ENV_LAKE, "").strip()
    if not lake:
        raise RuntimeError(
            f"feature_repo/definitions.py: {C.ENV_LAKE} is not set. Export the lake root whose "
            f"Feast snapshots ({C.FEAST_EXPORT_DIR}/, written by ctt-export-feature-tables) the "
            f"sources read, and {C.ENV_FEAST_DATA} (registry + online store folder), e.g.\n"
            f"  export {C.ENV_LAKE}=$PWD/demo_run/lake {C.ENV_FEAST_DATA}=$PWD/demo_run/feast\n"
            f"then run `feast apply` in feature_repo/ (pipelines/feast_ops.py sets both itself)")
    return lake


LAKE = _lake_root()
NO_TTL = timedelta(0)

user = Entity(name=C.FEAST_USER_ENTITY, join_keys=[C.USER_ID], value_type=ValueType.INT64,
              description="a user of the log (ctt_contracts.USER_ID)")
item = Entity(name=C.FEAST_ITEM_ENTITY, join_keys=[C.ITEM_ID], value_type=ValueType.INT64,
              description="a catalog item / subject item (ctt_contracts.ITEM_ID)")

user_states_source = FileSource(
    name=f"{C.T_USER_STATES}_snapshot", path=C.feast_snapshot_path(LAKE, C.T_USER_STATES),
    file_format=ParquetFormat(), timestamp_field=C.FEAST_SNAPSHOT_TS[C.T_USER_STATES],
    description="Parquet snapshot of the user_states Delta table (batch inference output)")
user_profile_source = FileSource(
    name=f"{C.T_USER_PROFILE_FEATURES}_snapshot",
    path=C.feast_snapshot_path(LAKE, C.T_USER_PROFILE_FEATURES),
    file_format=ParquetFormat(), timestamp_field=C.FEAST_SNAPSHOT_TS[C.T_USER_PROFILE_FEATURES],
    description="Parquet snapshot of the users Delta table with feature_ts")
item_categories_source = FileSource(
    name=f"{C.T_ITEM_CATEGORY_FEATURES}_snapshot",
    path=C.feast_snapshot_path(LAKE, C.T_ITEM_CATEGORY_FEATURES),
    file_format=ParquetFormat(), timestamp_field=C.FEAST_SNAPSHOT_TS[C.T_ITEM_CATEGORY_FEATURES],
    description="Parquet snapshot of the items Delta table with feature_ts")

user_sequence_state = FeatureView(
    name=C.FV_USER_SEQUENCE_STATE, entities=[user], ttl=NO_TTL, online=True,
    schema=[Field(name=C.HIDDEN_STATE, dtype=Array(Float32)),
            Field(name=C.MODEL_VERSION, dtype=String),
            Field(name=C.SEQUENCE_HASH, dtype=String)],
    source=user_states_source,
    description="encoder last hidden state(s) per user (offline half of the user tower)")

user_profile = FeatureView(
    name=C.FV_USER_PROFILE, entities=[user], ttl=NO_TTL, online=True,
    schema=[Field(name=C.AGE_BUCKET, dtype=Int64), Field(name=C.COUNTRY, dtype=String),
            Field(name=C.GENDER, dtype=String)],
    source=user_profile_source,
    description="user demographics fed to the online head")

item_categories = FeatureView(
    name=C.FV_ITEM_CATEGORIES, entities=[item], ttl=NO_TTL, online=True,
    schema=[Field(name=C.CATEGORY_IDS, dtype=Array(Int64)),
            Field(name=C.CATEGORY_WEIGHTS, dtype=Array(Float32))],
    source=item_categories_source,
    description="subject item categories + confidence weights -> real-time context")

contextual_two_tower_v1 = FeatureService(
    name=C.FEATURE_SERVICE, features=[user_sequence_state, user_profile, item_categories],
    description="everything the online resolver reads in its one get_online_features call")
