"""bench/decode_parity.py: the quality-speed frontier's bookkeeping (Pareto front, fastest configuration per
quality level, wins) and the 1.1B shape it builds."""

import math

from bench.decode_parity import TINYLLAMA_1B, Point, fastest_within, frontier_lines, pareto
from bench.random_llama import num_parameters

POINTS = [
    Point("strata", "int4 d30", 100.0, 1.06),
    Point("strata", "int4 d24 +adapter", 120.0, 1.40),
    Point("strata", "int8 d30", 80.0, 1.01),
    Point("strata", "float32 d30", 20.0, 1.00),
    Point("strata", "int8 d27", 70.0, 1.30),  # dominated by int4 d24 +adapter (slower and worse)
    Point("llama.cpp", "Q8_0", 120.0, 1.01),
    Point("llama.cpp", "Q4_0", 160.0, 1.20),
    Point("llama.cpp", "Q2_K", 200.0, 2.50),
]


def test_the_pareto_front_keeps_only_points_nothing_beats_on_both_axes():
    front = pareto(POINTS)
    names = [p.config for p in front]
    assert names == ["Q2_K", "Q4_0", "Q8_0", "float32 d30"]  # fastest first
    assert "int8 d27" not in names and "int4 d30" not in names  # both beaten by Q8_0 (faster, better)


def test_the_fastest_configuration_within_a_level_respects_the_level_and_the_engine():
    assert fastest_within(POINTS, "strata", 1.05).config == "int8 d30"
    assert fastest_within(POINTS, "strata", 1.5).config == "int4 d24 +adapter"
    assert fastest_within(POINTS, "llama.cpp", 1.05).config == "Q8_0"
    assert fastest_within(POINTS, "llama.cpp", 1.0) is None


def test_a_level_is_a_win_when_strata_meets_or_beats_llamacpp_there():
    lines, wins = frontier_lines(POINTS, (1.05, 1.5, 3.0))
    assert wins == 0  # 80 < 120, 120 < 160, 120 < 200
    tie = [*POINTS, Point("strata", "int4 d18 +adapter", 200.0, 2.9)]
    assert frontier_lines(tie, (1.05, 1.5, 3.0))[1] == 1  # 200 meets 200 at 3.0
    only_ours = [p for p in POINTS if p.engine == "strata"]
    _, wins = frontier_lines(only_ours, (1.05,))
    assert wins == 1
    assert any("| 1.05 | int8 d30 | 80.0 | Q8_0 | 120.0 | 0.67 |" == line for line in lines)


def test_the_random_model_has_tinyllama_11b_shape():
    assert math.isclose(num_parameters(TINYLLAMA_1B) / 1e9, 1.100, abs_tol=0.001)
    assert TINYLLAMA_1B["num_key_value_heads"] == 4 and TINYLLAMA_1B["num_hidden_layers"] == 22
