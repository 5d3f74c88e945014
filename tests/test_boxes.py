"""Tests for grpo_min/boxes.py: parsing, IoU and accuracy, frames, smart_resize."""

import doctest
import math
import time

import pytest

from grpo_min import boxes
from grpo_min.boxes import (
    accuracy_at,
    answer_has_format,
    clip_box,
    format_box,
    from_model_frame,
    iou,
    parse_answer,
    smart_resize,
    summarize_ious,
    to_model_frame,
)


def test_docstring_examples():
    result = doctest.testmod(boxes)
    assert result.attempted > 0 and result.failed == 0


# ---- IoU -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "a, b, expected",
    [
        ((0, 0, 10, 10), (0, 0, 10, 10), 1.0),  # identical
        ((0, 0, 10, 10), (20, 20, 30, 30), 0.0),  # disjoint
        ((0, 0, 10, 10), (10, 0, 20, 10), 0.0),  # touching edge: zero-width overlap
        ((0, 0, 10, 10), (10, 10, 20, 20), 0.0),  # touching corner
        ((0, 0, 10, 10), (2, 2, 7, 7), 25 / 100),  # contained
        ((0, 0, 10, 10), (0, 0, 10, 5), 0.5),  # half of the first box
        ((0, 0, 10, 10), (5, 0, 15, 10), 50 / 150),  # half-overlap, shifted
        ((0.5, 0.5, 2.5, 2.5), (1.5, 1.5, 3.5, 3.5), 1 / 7),  # decimals
        ((10, 10, 0, 0), (0, 0, 10, 10), 0.0),  # inverted
        ((0, 10, 10, 0), (0, 0, 10, 10), 0.0),  # inverted in y only
        ((5, 5, 5, 10), (0, 0, 10, 10), 0.0),  # zero width
        ((5, 5, 5, 5), (5, 5, 5, 5), 0.0),  # two points
        (None, (0, 0, 10, 10), 0.0),
        ((0, 0, 10, 10), None, 0.0),
        (None, None, 0.0),
        ((0, 0, math.nan, 10), (0, 0, 10, 10), 0.0),
        ((0, 0, math.inf, 10), (0, 0, 10, 10), 0.0),
    ],
)
def test_iou_hand_cases(a, b, expected):
    assert iou(a, b) == pytest.approx(expected)
    assert iou(b, a) == pytest.approx(expected)  # symmetric


def test_iou_never_nan_nor_above_one():
    huge = (0.0, 0.0, 1e308, 1e308)  # areas overflow to inf
    assert iou(huge, huge) == 0.0
    assert iou((0, 0, 1e200, 1e200), (0, 0, 1, 1)) == pytest.approx(0.0)
    for box in [(0.1, 0.2, 0.7, 0.9), (3, 7, 1e6 + 0.3, 2e6 + 0.1), (0, 0, 1e150, 1e150)]:
        assert iou(box, box) == 1.0, box  # a box on itself: exactly 1, neither above nor (overflow guard) 0
    assert isinstance(iou([0, 0, 2, 2], [1, 1, 3, 3]), float)
    tiny = (1e-300, 0.0, 3e-300, 1e-300)  # its area underflows to 0: a score of 0, not a ZeroDivisionError
    assert iou(tiny, tiny) == 0.0


# ---- Accuracy and summary ----------------------------------------------------------------------


def test_accuracy_threshold_is_strict():
    assert accuracy_at([0.5], 0.5) == 0.0
    assert accuracy_at([0.5000001], 0.5) == 100.0
    assert accuracy_at([0.3, 0.7], 0.3) == 50.0
    assert accuracy_at([0.7], 0.7) == 0.0
    assert accuracy_at([1.0, 1.0, 0.0], 0.5) == pytest.approx(200 / 3)
    assert accuracy_at([], 0.5) == 0.0


def test_summarize_ious_with_parse_failures():
    # Six samples, two of them parse failures (scored 0.0).
    ious = [0.9, 0.55, 0.5, 0.31, 0.0, 0.0]
    summary = summarize_ious(ious, parse_failures=2)
    assert summary == {
        "n": 6,
        "parse_failures": 2,
        "acc@0.3": 66.67,  # 4 / 6
        "acc@0.5": 33.33,  # 0.5 does not count
        "acc@0.7": 16.67,
        "miou": 37.67,  # 2.26 / 6
    }


def test_summarize_ious_edges():
    assert summarize_ious([]) == {
        "n": 0, "parse_failures": 0, "acc@0.3": 0.0, "acc@0.5": 0.0, "acc@0.7": 0.0, "miou": 0.0
    }
    assert summarize_ious([0.0, 0.0], parse_failures=2)["miou"] == 0.0
    with pytest.raises(ValueError):
        summarize_ious([0.5], parse_failures=2)


# ---- Parsing: realistic completions ------------------------------------------------------------

PLAIN = (
    "<think>The phrase describes a small pneumothorax at the left apex. The lung edge is visible "
    "near the top of the left hemithorax.</think>\n"
    '<answer>{"bbox_2d": [512, 88, 690, 240], "label": "left apical pneumothorax"}</answer>'
)
CHAIN_OF_BOX = (
    "<think>The left lung [480, 60, 820, 700] is examined first. At its apex [500, 80, 700, 250] "
    "a thin pleural line is seen without lung markings beyond it.</think>\n"
    "<answer>[505, 85, 695, 245]</answer>"
)
THINK_ONLY = (
    "<think>The right lower zone [120, 400, 380, 620] shows patchy opacity, consistent with "
    "consolidation [130, 420, 360, 600]</think>"
)
FENCED = (
    "<think>Cardiac silhouette is enlarged.</think>\n<answer>\n```json\n"
    '[\n  {"bbox_2d": [210, 300, 640, 590], "label": "cardiomegaly"}\n]\n```\n</answer>'
)
FENCED_TRUNCATED = (
    "<think>Opacity in the right middle zone.</think>\n<answer>\n```json\n"
    '[\n  {"bbox_2d": [98, 310, 402, 522], "label": "opacity"}'
)


@pytest.mark.parametrize(
    "text, expected",
    [
        (PLAIN, (512, 88, 690, 240)),
        (CHAIN_OF_BOX, (505, 85, 695, 245)),  # the answer, not the boxes in <think>
        (THINK_ONLY, None),  # reasoned, never answered
        (FENCED, (210, 300, 640, 590)),
        (FENCED_TRUNCATED, (98, 310, 402, 522)),  # no closing fence, no </answer>
        ("<think>x</think><answer>```json\n{\"bbox_2d\": [1, 2, 3, 4]}</answer>", (1, 2, 3, 4)),
        (  # several objects: the first is the prediction
            '<think>two nodules</think><answer>[{"bbox_2d": [10, 20, 30, 40], "label": "nodule"}, '
            '{"bbox_2d": [50, 60, 70, 80], "label": "nodule"}]</answer>',
            (10, 20, 30, 40),
        ),
        ("<answer>[1, 2, 3, 4] or maybe [5, 6, 7, 8]</answer>", (1, 2, 3, 4)),
        ("<answer>[[15, 25, 35, 45]]</answer>", (15, 25, 35, 45)),
        ('<answer>{"bbox": [1, 2, 3, 4]}</answer>', (1, 2, 3, 4)),
        ('<answer>{"box": [1,2,3,4]}</answer>', (1, 2, 3, 4)),
        # Qwen2-VL, with and without its special tokens, with spaces
        ("<|object_ref_start|>the mass<|object_ref_end|><|box_start|>(120,45),(300,210)<|box_end|>",
         (120, 45, 300, 210)),
        ("<|box_start|>( 120 , 45 ), ( 300 , 210 )<|box_end|>", (120, 45, 300, 210)),
        ("the mass(120,45),(300,210)", (120, 45, 300, 210)),
        ("<think>a</think><answer><|box_start|>(1,2),(3,4)<|box_end|></answer>", (1, 2, 3, 4)),
        # no tags at all: the whole text, first box
        ('{"bbox_2d": [33, 44, 55, 66], "label": "effusion"}', (33, 44, 55, 66)),
        ("The finding is at [7, 8, 9, 10].", (7, 8, 9, 10)),
        # numbers
        ("<answer>[10.5, 20.25, 30.75, 40.0]</answer>", (10.5, 20.25, 30.75, 40.0)),
        ("<answer>[-12, -3.5, 40, 50]</answer>", (-12, -3.5, 40, 50)),
        ("<answer>[.5, 1., 2e1, 3E+1]</answer>", (0.5, 1.0, 20.0, 30.0)),
        ("<answer>[+1, 2, 3, 4]</answer>", (1, 2, 3, 4)),
        ("<answer>[1, 2, 99999999999999999999, 4]</answer>", (1, 2, 1e20, 4)),
        # swapped corners come back ordered; a zero-area box is still a box
        ("<answer>[300, 400, 100, 200]</answer>", (100, 200, 300, 400)),
        ("<answer>[100, 400, 300, 200]</answer>", (100, 200, 300, 400)),
        ("<answer>[10, 10, 10, 50]</answer>", (10, 10, 10, 50)),
        # tags: case-insensitive, the last <answer> wins, cut-off answer still read
        ("<THINK>x</THINK><ANSWER>[1, 2, 3, 4]</ANSWER>", (1, 2, 3, 4)),
        ("<think>I will write <answer>[9, 9, 9, 9]</answer> at the end</think><answer>[1, 2, 3, 4]</answer>",
         (1, 2, 3, 4)),
        ("<think>x</think><answer>[1, 2, 3, 4", None),  # cut inside the box: nothing to read
        ("<think>x</think><answer>[1, 2, 3, 4]", (1, 2, 3, 4)),
        ("<think>the lobe [1, 2, 3, 4]</think><answer>the left lobe</answer>", None),
        ("<think>the lobe [1, 2, 3, 4]</think> [5, 6, 7, 8]", None),  # <think> without <answer>
        ("<think>the lobe [1, 2, 3, 4]", None),  # cut off while thinking
        ("the lobe [1, 2, 3, 4]</think>", None),  # only a closing think tag
    ],
)
def test_parse_answer(text, expected):
    assert parse_answer(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "<answer></answer>",
        "<answer>[1, 2, 3]</answer>",  # fewer than 4 numbers
        "<answer>[1, 2]</answer>",
        "<answer>[1, 2, 3, 4, 5]</answer>",  # not a box either
        "<answer>[x1, y1, x2, y2]</answer>",
        "<answer>[nan, 1, 2, 3]</answer>",
        "<answer>[NaN, NaN, NaN, NaN]</answer>",
        "<answer>[inf, 0, 1, 1]</answer>",
        "<answer>[1e999, 0, 1, 1]</answer>",  # overflows to inf
        "<answer>[1, 2, 3, 4e400]</answer>",
        "<answer>(1,2),(3)</answer>",
        "<answer>(1, 2, 3, 4)</answer>",
        "<answer>1, 2, 3, 4</answer>",
        "no box here at all",
        "\x00\x01\ufffd[]][[)(",
        None,
        123,
        b"[1, 2, 3, 4]",
        [1, 2, 3, 4],
        {"bbox_2d": [1, 2, 3, 4]},
    ],
)
def test_parse_answer_garbage_is_none(text):
    assert parse_answer(text) is None


def test_parse_answer_skips_non_finite_box_for_the_next_one():
    assert parse_answer("<answer>[nan, 1, 2, 3] [1, 2, 3, 4]</answer>") == (1, 2, 3, 4)
    assert parse_answer("<answer>[1e999, 1, 2, 3] [1, 2, 3, 4]</answer>") == (1, 2, 3, 4)


def test_parse_answer_returns_floats():
    box = parse_answer("[1, 2, 3, 4]")
    assert all(isinstance(v, float) for v in box)


ADVERSARIAL = [
    "[" + "1" * 100_000,
    "[" + " " * 100_000 + "1",
    "[1, " * 25_000,
    "[1, 2, 3, " * 10_000,
    "[" * 100_000,
    "(1," * 33_000,
    "(1, 2), (" * 11_000,
    "[1.1.1.1.1" * 10_000,
    "[-" * 50_000,
    "1e" * 50_000,
    "<answer>" * 12_500,
    "<think>" * 14_000,
    "</think><answer>" * 6_000,
    "<answer>" + "[1, 2, 3, 4 " * 8_000,
    "<think>" + "[1, 2, 3, 4] " * 8_000 + "</think><answer>" + "[" * 50_000 + "[1, 2, 3, 4]",
    "[" + ", ".join(["1"] * 30_000) + "]",
    "[" + "9" * 60_000 + ", 1, 2, 3]",  # far past int()'s 4300-digit limit; float() gives inf
]


@pytest.mark.parametrize("text", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
def test_parser_is_fast_on_adversarial_input(text):
    assert len(text) >= 50_000
    start = time.perf_counter()
    parse_answer(text)
    answer_has_format(text)
    assert time.perf_counter() - start < 1.0  # linear: milliseconds; quadratic would be minutes


def test_adversarial_inputs_still_read_the_box():
    text = "<think>" + "[1, 2, 3, 4] " * 8_000 + "</think><answer>" + "[" * 50_000 + "[5, 6, 7, 8]"
    assert parse_answer(text) == (5, 6, 7, 8)
    assert parse_answer("[" + "9" * 60_000 + ", 1, 2, 3]") is None  # inf is not a coordinate


# ---- Format reward test ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        PLAIN,
        CHAIN_OF_BOX,
        FENCED,
        "<think></think><answer>[1, 2, 3, 4]</answer>",  # empty reasoning still has the format
        "  \n<think>x</think>\n\n<answer>[1, 2, 3, 4]</answer>\n ",
        '<think>x</think><answer>[{"bbox_2d": [1, 2, 3, 4]}, {"bbox_2d": [5, 6, 7, 8]}]</answer>',
        "<think>x</think><answer><|box_start|>(1,2),(3,4)<|box_end|></answer>",
    ],
)
def test_answer_has_format_positive(text):
    assert answer_has_format(text)


@pytest.mark.parametrize(
    "text",
    [
        "<answer>[1, 2, 3, 4]</answer><think>x</think>",  # answer before think
        "<answer>[1, 2, 3, 4]</answer>",  # missing think
        "<think>x</think>",  # missing answer
        "<think>x</think><answer>the left apex</answer>",  # answer without a box
        "<think>x</think><answer>[1, 2, 3]</answer>",
        "<think>x [1, 2, 3, 4]</think><answer></answer>",  # the box is only in the reasoning
        "<think>x</think> and so <answer>[1, 2, 3, 4]</answer>",  # text between the blocks
        "Sure! <think>x</think><answer>[1, 2, 3, 4]</answer>",  # text before
        "<think>x</think><answer>[1, 2, 3, 4]</answer> Done.",  # text after
        "<think>x</think><answer>[1, 2, 3, 4]",  # cut off before </answer>
        FENCED_TRUNCATED,
        "<think>x</think><answer>[1, 2, 3, 4]</answer><answer>[1, 2, 3, 4]</answer>",
        "<think>a</think><think>b</think><answer>[1, 2, 3, 4]</answer>",
        "<think>x</answer><answer>[1, 2, 3, 4]</think>",
        "<think>x<answer>[1, 2, 3, 4]</think></answer>",
        "<think>x</think><answer>[1, 2, 3, 4]</answer",
        "",
        None,
        42,
    ],
)
def test_answer_has_format_negative(text):
    assert not answer_has_format(text)


# ---- format_box --------------------------------------------------------------------------------


def test_format_box_round_trips_through_the_parser():
    assert format_box((10.4, 20.6, 300.0, 400.5)) == "[10,21,300,400]"
    assert format_box((1, 2, 3, 4)) == "[1,2,3,4]"
    assert parse_answer(f"<think>x</think><answer>{format_box((12.2, 7.9, 99.5, 120.0))}</answer>") == (
        12, 8, 100, 120
    )


# ---- clip_box ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "box, expected",
    [
        ((10, 20, 30, 40), (10, 20, 30, 40)),  # inside: unchanged
        ((-5, -5, 30, 40), (0, 0, 30, 40)),
        ((10, 20, 150, 90), (10, 20, 100, 80)),
        ((-10, -10, 200, 200), (0, 0, 100, 80)),
        ((0, 0, 100, 80), (0, 0, 100, 80)),
        ((110, 10, 150, 50), None),  # entirely right of the image
        ((10, -50, 50, -10), None),  # entirely above
        ((100, 10, 150, 50), None),  # touches the right edge only: zero width left
        ((30, 10, 30, 50), None),  # zero width
        ((50, 10, 20, 40), None),  # inverted
        ((math.nan, 10, 20, 40), None),
    ],
)
def test_clip_box(box, expected):
    assert clip_box(box, 100, 80) == expected


# ---- smart_resize ------------------------------------------------------------------------------


def test_smart_resize_known_value():
    # A 2544 x 3056 (width x height) radiograph at max_pixels=1003520 (= 28 * 28 * 1280).
    assert smart_resize(3056, 2544, max_pixels=1003520) == (1092, 896)
    assert smart_resize(3056, 2544) == (1092, 896)  # the same, as the default
    height, width = smart_resize(3056, 2544, max_pixels=12845056)  # the released training setting
    assert height % 28 == 0 and width % 28 == 0 and height * width <= 12845056


SIZES = [  # (height, width), with the max_pixels / min_pixels to use
    (h, w, max_pixels, min_pixels)
    for (h, w) in [
        (3056, 2544), (2544, 3056), (1024, 1024), (512, 512), (224, 224), (2048, 2500),
        (4020, 4892), (3000, 2000), (14, 2800), (28, 28), (27, 27), (1, 1), (10, 13), (55, 57),
        (100, 7000), (7000, 100), (333, 777), (1080, 1920), (389, 512), (256, 320),
    ]
    for max_pixels, min_pixels in [(28 * 28 * 1280, 56 * 56), (12845056, 3136)]
] + [
    (h, w, 28 * 28 * 256, 28 * 28 * 4)
    for (h, w) in [(3056, 2544), (50, 60), (700, 300), (1, 150), (999, 1001), (2240, 2240),
                   (57, 11000), (4096, 4096), (123, 456), (641, 479)]
]


def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl import image_processing_qwen2_vl as qwen2_vl  # a required package: never skipped
    assert len(SIZES) >= 50
    for height, width, max_pixels, min_pixels in SIZES:
        ours = smart_resize(height, width, min_pixels=min_pixels, max_pixels=max_pixels)
        theirs = qwen2_vl.smart_resize(height, width, min_pixels=min_pixels, max_pixels=max_pixels)
        assert ours == tuple(theirs), (height, width, max_pixels, min_pixels)
        assert ours[0] % 28 == 0 and ours[1] % 28 == 0


def test_smart_resize_rejects_extreme_aspect_and_empty_images():
    with pytest.raises(ValueError):
        smart_resize(10, 2010)  # aspect ratio 201
    with pytest.raises(ValueError):
        smart_resize(2010, 10)
    with pytest.raises(ValueError):
        smart_resize(0, 100)
    assert smart_resize(10, 2000) == (28, 812)  # exactly 200 is allowed (transformers gives the same)


# ---- Coordinate frames -------------------------------------------------------------------------


ORIG = (2544, 3056)  # (width, height)
RESIZED = tuple(reversed(smart_resize(3056, 2544, max_pixels=1003520)))  # (896, 1092), (w, h)


def test_frame_known_values():
    assert RESIZED == (896, 1092)
    assert to_model_frame((636, 764, 1272, 1528), ORIG, RESIZED) == pytest.approx((224, 273, 448, 546))
    assert to_model_frame((0, 0, 2544, 3056), ORIG, RESIZED) == pytest.approx((0, 0, 896, 1092))
    assert to_model_frame((636, 764, 1272, 1528), ORIG, RESIZED, frame="norm1000") == pytest.approx(
        (250, 250, 500, 500)
    )
    assert to_model_frame((0, 0, 2544, 3056), ORIG, RESIZED, frame="norm1000") == pytest.approx(
        (0, 0, 1000, 1000)
    )
    assert from_model_frame((224, 273, 448, 546), ORIG, RESIZED) == pytest.approx((636, 764, 1272, 1528))
    assert from_model_frame((250, 250, 500, 500), ORIG, RESIZED, "norm1000") == pytest.approx(
        (636, 764, 1272, 1528)
    )


@pytest.mark.parametrize("frame", ["absolute", "norm1000"])
@pytest.mark.parametrize(
    "box, orig, resized",
    [
        ((123.4, 56.7, 890.1, 1234.5), (2544, 3056), (896, 1092)),
        ((0, 0, 640, 480), (640, 480), (644, 476)),
        ((5, 6, 7, 8), (13, 17), (56, 56)),
        ((-20, 30, 5000, 40), (4892, 4020), (3948, 3248)),  # outside the image: kept, not clipped
    ],
)
def test_frame_round_trip(frame, box, orig, resized):
    there = to_model_frame(box, orig, resized, frame)
    assert from_model_frame(there, orig, resized, frame) == pytest.approx(box)
    # Scaling x and y (even by different factors) scales every area alike: IoU is unchanged.
    other = (box[0] + 3, box[1] + 2, box[2] + 1, box[3] + 4)
    assert iou(there, to_model_frame(other, orig, resized, frame)) == pytest.approx(iou(box, other))


def test_norm1000_ignores_resized_size():
    box = (100, 200, 300, 400)
    assert to_model_frame(box, (1000, 1000), (1000, 1000), "absolute") == to_model_frame(
        box, (1000, 1000), (28, 28), "norm1000"
    )


def test_unknown_frame_and_bad_sizes():
    with pytest.raises(ValueError):
        to_model_frame((1, 2, 3, 4), (10, 10), (28, 28), frame="normalized")
    with pytest.raises(ValueError):
        from_model_frame((1, 2, 3, 4), (10, 10), (28, 28), frame="relative")
    with pytest.raises(ValueError):
        to_model_frame((1, 2, 3, 4), (0, 10), (28, 28))
    with pytest.raises(ValueError):
        from_model_frame((1, 2, 3, 4), (10, 10), (28, 0))
