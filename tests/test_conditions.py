"""Conditions tables: reading, the matching rule and its errors, kinds, scaling, class folders."""

from __future__ import annotations

import re

import numpy as np
import pytest

from medsynth.conditions import (
    CATEGORICAL,
    CONTINUOUS,
    ConditionColumn,
    ConditionsError,
    conditions_from_folders,
    conditions_from_table,
    encode,
    id_matches,
    read_table,
    scan_name_parts,
)

IXI_NAMES = [
    "IXI002-Guys-0828_T1.nii.gz",
    "IXI012-HH-1211_T1.nii.gz",
    "IXI013-HH-1212_T1.nii.gz",
    "IXI014-HH-1236_T1.nii.gz",
]


def write(path, text):
    path.write_text(text)
    return path


def test_scan_name_parts_drop_image_extensions_and_dicom_details():
    assert scan_name_parts("IXI012-HH-1211_T1.nii.gz") == ("IXI012-HH-1211_T1",)
    assert scan_name_parts("sub-01/anat/sub-01_T1w.nii") == ("sub-01", "anat", "sub-01_T1w")
    assert scan_name_parts("patient7/CT head (series 3, 120 slices)") == ("patient7", "CT head")


@pytest.mark.parametrize(
    ("identifier", "name", "matches"),
    [
        ("IXI012-HH-1211", "IXI012-HH-1211_T1.nii.gz", True),
        ("ixi012-hh-1211", "IXI012-HH-1211_T1.nii.gz", True),  # case is ignored
        ("IXI012", "IXI012-HH-1211_T1.nii.gz", True),  # followed by a separator
        ("IXI01", "IXI012-HH-1211_T1.nii.gz", False),  # "1" is not a separator
        ("sub-1", "sub-10/anat/sub-10_T1w.nii.gz", False),
        ("sub-10", "sub-10/anat/sub-10_T1w.nii.gz", True),  # the folder, exactly
        ("case7", "case7.mha", True),
        ("", "anything.nii", False),
    ],
)
def test_the_matching_rule(identifier, name, matches):
    assert id_matches(identifier, scan_name_parts(name)) is matches


def test_ixi_style_table_matches_by_id_prefix_and_infers_kinds(tmp_path):
    table = write(
        tmp_path / "participants.csv",
        "MRID,Age,Sex\nIXI012-HH-1211,38.78,M\nIXI013-HH-1212,46.71,M\nIXI014-HH-1236,34.24,F\nIXI999-XX-0000,50,F\n",
    )
    found = conditions_from_table(table, IXI_NAMES)
    assert found.id_column == "MRID"  # guessed: the column whose values match the scans
    assert found.rows == [None, 0, 1, 2]  # IXI002 has no row
    assert found.unmatched_ids == ["IXI999-XX-0000"]
    age, sex = found.columns
    assert (age.kind, sex.kind) == (CONTINUOUS, CATEGORICAL)
    assert sex.categories == ("F", "M")
    ages = np.array([38.78, 46.71, 34.24])  # scaled over the matched scans only, not the extra row
    assert age.mean == pytest.approx(ages.mean()) and age.std == pytest.approx(ages.std())
    assert (age.minimum, age.maximum) == (34.0, 47.0)  # rounded outward: outward_range
    assert found.values[0] == {"Age": None, "Sex": None}
    numbers, present, classes = found.codes()
    assert present[:, 0].tolist() == [False, True, True, True]
    assert classes[:, 0].tolist() == [0, 2, 2, 1]  # 0 unknown, then 1 + index in ("F", "M")
    assert numbers[1, 0] == pytest.approx((38.78 - ages.mean()) / ages.std())


def test_the_longest_matching_id_wins(tmp_path):
    table = write(tmp_path / "t.csv", "id,score\nIXI012,1\nIXI012-HH-1211,2\n")
    found = conditions_from_table(table, ["IXI012-HH-1211_T1.nii.gz"], id_column="id")
    assert found.values[0]["score"] == 2.0


def test_tsv_and_semicolon_tables_read_the_same(tmp_path):
    text = "MRID\tAge\tSex\nIXI012-HH-1211\t38.78\tM\n"
    for path in (write(tmp_path / "t.tsv", text), write(tmp_path / "t.txt", text.replace("\t", ";"))):
        table = read_table(path)
        assert table.columns == ("MRID", "Age", "Sex") and table.rows == (("IXI012-HH-1211", "38.78", "M"),)


def test_missing_values_train_as_unknown_and_unparsable_values_are_reported(tmp_path):
    table = write(
        tmp_path / "t.csv",
        "MRID,Age,Sex\nIXI002-Guys-0828,NA,\nIXI012-HH-1211,38,M\nIXI013-HH-1212,forty,F\nIXI014-HH-1236,61,n/a\n",
    )
    found = conditions_from_table(table, IXI_NAMES, continuous=("Age",))
    assert [v["Age"] for v in found.values] == [None, 38.0, None, 61.0]
    assert [v["Sex"] for v in found.values] == [None, "M", "F", None]
    assert len(found.unparsed) == 1
    assert "IXI013-HH-1212_T1.nii.gz" in found.unparsed[0] and "'forty' is not a number" in found.unparsed[0]


def test_a_numeric_class_column_is_flagged_and_can_be_declared_categorical(tmp_path):
    table = write(
        tmp_path / "t.csv", "MRID,Diagnosis\n" + "".join(f"{n[:14]},{i % 2}\n" for i, n in enumerate(IXI_NAMES))
    )
    inferred = conditions_from_table(table, IXI_NAMES)
    assert inferred.columns[0].kind == CONTINUOUS
    assert any("conditions.categorical=[Diagnosis]" in note for note in inferred.notes)
    declared = conditions_from_table(table, IXI_NAMES, categorical=("Diagnosis",))
    assert declared.columns[0].categories == ("0", "1")


@pytest.mark.parametrize(
    ("text", "kwargs", "message"),
    [
        ("", {}, "empty"),
        ("MRID\nIXI012\n", {}, "one column"),
        ("MRID,Age\n", {}, "no rows"),
        ("MRID,Age,Age\nIXI012,1,2\n", {}, "repeated column"),
        ("MRID,Age\nIXI012,1,2\n", {}, "line 2: 3 cells"),
        ("MRID,Age\nIXI012-HH-1211,1\nixi012-hh-1211,2\n", {}, "on two rows"),
        ("subject,Age\nP1,1\nP2,2\n", {}, "no column's values match"),
        ("MRID,Age\nIXI012-HH-1211,1\n", {"id_column": "ID"}, "conditions.id_column names ['ID']"),
        ("MRID,Age\nIXI012-HH-1211,1\n", {"use": ("Sex",)}, "conditions.columns names ['Sex']"),
        ("MRID,Age\nIXI012-HH-1211,NA\n", {}, "no value for any scan"),
    ],
)
def test_bad_tables_are_one_clear_error_naming_the_file(tmp_path, text, kwargs, message):
    path = write(tmp_path / "bad.csv", text)
    with pytest.raises(ConditionsError, match=re.escape(message)) as caught:
        conditions_from_table(path, IXI_NAMES, **kwargs)
    assert "bad.csv" in str(caught.value) or "conditions." in str(caught.value)


def test_a_missing_table_is_one_line(tmp_path):
    with pytest.raises(ConditionsError, match="no such file"):
        conditions_from_table(tmp_path / "nope.csv", IXI_NAMES)


def test_scaling_round_trips_in_the_tables_units():
    column = ConditionColumn("Age", CONTINUOUS, mean=47.0, std=16.5, minimum=20.0, maximum=80.0)
    for age in (20.0, 47.0, 72.5):
        assert column.in_units(column.standardise(age)) == pytest.approx(age)
    assert ConditionColumn.from_dict(column.to_dict()) == column
    sex = ConditionColumn("Sex", CATEGORICAL, categories=("F", "M"))
    assert ConditionColumn.from_dict(sex.to_dict()) == sex
    numbers, present, classes = encode((column, sex), [{"Age": 72.5, "Sex": "F"}, {"Age": None, "Sex": None}])
    assert numbers[:, 0].tolist() == pytest.approx([(72.5 - 47.0) / 16.5, 0.0])
    assert present.tolist() == [[True], [False]] and classes.tolist() == [[1], [0]]


def test_class_folders_are_a_categorical_column():
    found = conditions_from_folders(["healthy/a.nii.gz", "tumour/b.nii.gz", "tumour/c/series (3 slices)"])
    (column,) = found.columns
    assert (column.name, column.kind, column.categories) == ("class", CATEGORICAL, ("healthy", "tumour"))
    assert [v["class"] for v in found.values] == ["healthy", "tumour", "tumour"]


@pytest.mark.parametrize(
    ("names", "message"), [(["a.nii.gz", "x/b.nii.gz"], "in no class folder"), (["x/a.nii", "x/b.nii"], "one class")]
)
def test_class_folders_refuse_loose_scans_and_a_single_class(names, message):
    with pytest.raises(ConditionsError, match=message):
        conditions_from_folders(names)


def test_the_plan_keeps_the_range_rounded_outward_not_a_patients_exact_value():
    from medsynth.conditions import outward_range

    assert outward_range(20.17, 79.41) == (20.0, 80.0)  # IXI's ages: a sweep 20:80 is in range
    assert outward_range(0.123, 0.871) == (0.12, 0.88)  # two significant figures of the width
    assert outward_range(40.0, 65.0) == (40.0, 65.0)  # already round: unchanged
    low, high = outward_range(-3.21, 5.7)
    assert low <= -3.21 and high >= 5.7
