"""Session settings a step changes for its own duration (pipelines.spark), on a real session."""
from __future__ import annotations

import pytest

from pipelines.spark import (ADAPTIVE_CONF, ROWS_PER_SHUFFLE_PARTITION, SHUFFLE_PARTITIONS_CONF,
                             SMALL_INPUT_MAX_ROWS, session_settings, small_input_settings)

UNSET_KEY = "spark.ctt.test.unset"


def test_small_input_turns_adaptive_execution_off_with_partitions_sized_to_the_rows():
    assert small_input_settings(10, 2) == {ADAPTIVE_CONF: "false", SHUFFLE_PARTITIONS_CONF: "2"}
    assert small_input_settings(0, 0)[SHUFFLE_PARTITIONS_CONF] == "1"
    assert small_input_settings(2 * ROWS_PER_SHUFFLE_PARTITION + 1, 2)[
        SHUFFLE_PARTITIONS_CONF] == "3"
    assert small_input_settings(SMALL_INPUT_MAX_ROWS, 64)[SHUFFLE_PARTITIONS_CONF] == "64"
    assert small_input_settings(SMALL_INPUT_MAX_ROWS, 2)[SHUFFLE_PARTITIONS_CONF] == str(
        SMALL_INPUT_MAX_ROWS // ROWS_PER_SHUFFLE_PARTITION)
    assert small_input_settings(SMALL_INPUT_MAX_ROWS + 1, 2) == {}


@pytest.mark.spark
def test_session_settings_are_restored_or_unset_after_the_block_even_when_it_raises(spark):
    before = spark.conf.get(SHUFFLE_PARTITIONS_CONF)
    assert spark.conf.get(UNSET_KEY, None) is None
    with pytest.raises(RuntimeError, match="boom"):
        with session_settings(spark, {SHUFFLE_PARTITIONS_CONF: "7", UNSET_KEY: "x"}):
            assert spark.conf.get(SHUFFLE_PARTITIONS_CONF) == "7"
            assert spark.conf.get(UNSET_KEY) == "x"
            assert spark.range(20).repartition(3).groupBy("id").count().rdd.getNumPartitions() == 7
            raise RuntimeError("boom")
    assert spark.conf.get(SHUFFLE_PARTITIONS_CONF) == before
    assert spark.conf.get(UNSET_KEY, None) is None
    with session_settings(spark, {}):
        assert spark.conf.get(SHUFFLE_PARTITIONS_CONF) == before
