"""The scoring rules of answers.py: lmms-eval's extractor on cases of its own contract, the rule of
lmms-eval's Video-MME task before April 2026 worked by hand from its code, and the project's strict rule."""

import pytest

from streamer.evaluation.answers import (DEFAULT_SCORING, SCORING, extract_answer_letter, lmms_eval_choice,
                                         lmms_eval_legacy_choice)

ABCD = "ABCD"

# From lmms-eval's test/eval/mcq_extract/cases.json (the contract of extract_mcq_answer, 271 cases), every
# category: (case id, response, choices as one string, None for the default A-H; expected, "" for no answer).
LMMS_EVAL_CASES = [
    ("regression_lowercase_explanation_dog", "The answer is b because the image shows a dog.", ABCD, "B"),
    ("regression_lowercase_because", "the answer is b because it is correct", ABCD, "B"),
    ("regression_closed_lowercase_tag", "<answer>b</answer>", ABCD, "B"),
    ("regression_cubic_period", "The shape is cubic. I think so.", ABCD, ""),
    ("regression_data_period", "I need more data. Please clarify.", ABCD, ""),
    ("regression_a_explanation", "A because it is the only valid option", ABCD, "A"),
    ("legacy_bare_upper", "B", None, "B"),
    ("legacy_correct_parenthesized", "The correct answer is (B).", None, "B"),
    ("legacy_answer_colon", "Answer: A", None, "A"),
    ("legacy_pick_explanation", "I pick C and stop", None, "C"),
    ("legacy_best_option", "The best option is B)", None, "B"),
    ("legacy_option_correct", "Option A is correct", None, "A"),
    ("legacy_lower_phrase_a", "the answer is a", None, "A"),
    ("legacy_lower_assertion", "b is correct", None, "B"),
    ("legacy_bare_lower_a", "a", None, "A"),
    ("legacy_open_answer_tag", "<answer> c", None, "C"),
    ("legacy_open_answer_marker", "answer> d", None, "D"),
    ("legacy_article_triangle", "A triangle has three sides.", None, ""),
    ("legacy_acronym_dna", "The DNA helix unwinds during replication.", None, ""),
    ("legacy_article_movie", "I saw a movie", None, ""),
    ("legacy_variable_lower_c", "the value of c", None, ""),
    ("legacy_plan_lower_b", "I'll go with plan b", None, ""),
    ("legacy_empty", "", None, ""),
    ("legacy_a_period_explanation", "A. because it handles text better", "AB", "A"),
    ("input_tabs_newlines", "\t\n\r\n", ABCD, ""),
    ("input_punctuation", "...", ABCD, ""),
    ("input_refusal", "I cannot determine the answer from the image.", ABCD, ""),
    ("input_number", "2", ABCD, ""),
    ("input_empty_choices_default", "h", [], "H"),
    ("bare_outer_whitespace", "\n\t C \t\n", None, "C"),
    ("bare_default_upper_h", "H", None, "H"),
    ("bare_default_invalid_i", "I", None, ""),
    ("bare_period", "C.", None, "C"),
    ("bare_colon", "d:", None, "D"),
    ("bare_right_paren", "b)", None, "B"),
    ("label_uppercase_period", "B. a yellow bus", ABCD, "B"),
    ("label_lowercase_colon", "c: the object on the left", ABCD, "C"),
    ("label_lowercase_parentheses", "(a) a blue sphere", ABCD, "A"),
    ("label_uppercase_colon_a", "A: a triangle", ABCD, "A"),
    ("label_leading_line_whitespace", "\n  (D) Four wheels are visible.", ABCD, "D"),
    ("label_standalone_wrapped_in_prose", "The visible count matches (C).", ABCD, "C"),
    ("label_trailing_separate_line", "The red object is above the table.\nB", ABCD, "B"),
    ("label_trailing_comma", "After checking the diagram, C.", ABCD, "C"),
    ("label_trailing_semicolon", "The wheel count is four; D", ABCD, "D"),
    ("label_same_wrapped_repetition", "(B) is my selection.\n(B)", ABCD, "B"),
    ("markdown_bold_bare", "**B**", ABCD, "B"),
    ("markdown_italic_bare", "*c*", ABCD, "C"),
    ("markdown_code_bare", "`d`", ABCD, "D"),
    ("markdown_bold_declaration", "The answer is **b** because two cars are visible.", ABCD, "B"),
    ("markdown_bold_leading_label", "**B.** The object is a bus.", ABCD, "B"),
    ("markdown_single_quotes", "'B'", ABCD, "B"),
    ("markdown_curly_quotes", "“d”", ABCD, "D"),
    ("markdown_underscore", "_B_", ABCD, "B"),
    ("markdown_double_underscore", "__c__", ABCD, "C"),
    ("container_tag_upper", "<answer>C</answer>", ABCD, "C"),
    ("container_tag_whitespace", "<answer>\n  d \n</answer>", ABCD, "D"),
    ("container_tag_case", "<ANSWER>b</ANSWER>", ABCD, "B"),
    ("container_tag_distractors", "A could work. <answer>B</answer> The diagram also contains C labels.", ABCD, "B"),
    ("container_tag_phrase", "<answer>The answer is c.</answer>", ABCD, "C"),
    ("container_tag_invalid_final", "<answer>B</answer>\n<answer>Z</answer>", ABCD, ""),
    ("container_tag_empty_final", "<answer>B</answer>\n<answer></answer>", ABCD, ""),
    ("container_tag_alternatives", "<answer>A or B</answer>", ABCD, ""),
    ("container_boxed_upper", "\\boxed{D}", ABCD, "D"),
    ("container_boxed_wrapped", "\\boxed{(C)}", ABCD, "C"),
    ("container_boxed_invalid_final", "\\boxed{A} then \\boxed{E}", ABCD, ""),
    ("container_mixed_tag_then_box", "<answer>A</answer>\n\\boxed{C}", ABCD, "C"),
    ("container_container_over_later_declaration", "<answer>B</answer>\nAnswer: C", ABCD, "B"),
    ("container_container_invalid_over_valid_phrase", "The answer is A. <answer>none</answer>", ABCD, ""),
    ("container_unfinished_box", "\\boxed{B", ABCD, ""),
    ("container_nested_distinct_tags", "<answer><answer>A</answer>B</answer>", ABCD, ""),
    ("container_mismatched_tag", "<answer>B</wrong>", ABCD, ""),
    ("container_boxed_text", "\\boxed{\\text{B}}", ABCD, "B"),
    ("container_stray_closing_tag", "The answer is B.</answer>", ABCD, ""),
    ("container_nested_conflicting_boxes", "\\boxed{B \\boxed{C}}", ABCD, ""),
    ("container_multiline_choices", "<answer>B\nD</answer>", ABCD, ""),
    ("phrase_answer_equals_case", "THE ANSWER IS d.", ABCD, "D"),
    ("phrase_final_answer_colon", "Final answer: B", ABCD, "B"),
    ("phrase_answer_newline", "Answer:\nC", ABCD, "C"),
    ("phrase_answer_nbsp", "The answer is\u00a0b", ABCD, "B"),
    ("phrase_choose_lower", "I choose c because the arrow points left.", ABCD, "C"),
    ("phrase_option_lower_correct", "Option b is correct.", ABCD, "B"),
    ("phrase_answer_parenthesized", "Answer: (d)", ABCD, "D"),
    ("phrase_invalid_answer_word", "Answer: dog", ABCD, ""),
    ("phrase_invalid_answer_acronym", "The answer is DNA.", ABCD, ""),
    ("phrase_nonadjacent_letter", "The answer is probably B.", ABCD, ""),
    ("phrase_choose_plan_b", "I choose plan B.", ABCD, ""),
    ("phrase_out_of_alphabet", "The answer is E because five edges are visible.", ABCD, ""),
    ("multilingual_chinese_is", "答案是B。", ABCD, "B"),
    ("multilingual_chinese_wrapped", "答案是（B）", ABCD, "B"),
    ("multilingual_korean_correct", "정답은 b입니다.", ABCD, "B"),
    ("multilingual_korean_colon", "답: a", ABCD, "A"),
    ("multilingual_japanese_answer", "答えはBです。", ABCD, "B"),
    ("multilingual_japanese_invalid_word", "答えはCatです。", ABCD, ""),
    ("multilingual_korean_arbitrary_suffix", "정답은 b고양이.", ABCD, ""),
    ("correction_later_answer", "I choose A. Actually, the answer is B.", ABCD, "B"),
    ("correction_upper_to_lower", "Answer: D\nFinal answer: a", ABCD, "A"),
    ("correction_implicit_to_explicit", "A. Initial guess.\nThe answer is C.", ABCD, "C"),
    ("correction_explicit_before_implicit", "The answer is B.\n(D)", ABCD, "B"),
    ("correction_last_invalid", "I pick B. Final answer: E", ABCD, ""),
    ("correction_last_no_token", "Answer: C\nFinal answer: unknown", ABCD, ""),
    ("correction_last_ambiguous", "I choose D. Final answer: A or B", ABCD, ""),
    ("correction_alternatives_then_correction", "Answer: A or B. Actually, I choose C.", ABCD, "C"),
    ("correction_option_assertion_later", "The answer is D. Option B is correct.", ABCD, "B"),
    ("correction_invalid_then_valid", "Answer: Z. I choose B.", ABCD, "B"),
    ("ambiguous_bare_or", "A or B", ABCD, ""),
    ("ambiguous_bare_slash", "A/B", ABCD, ""),
    ("ambiguous_phrase_and", "Answer: B and C", ABCD, ""),
    ("ambiguous_phrase_comma", "Answer: A, B", ABCD, ""),
    ("ambiguous_parenthesized_pair", "(A) or (D)", ABCD, ""),
    ("ambiguous_two_labels", "A. A dog\nB. A cat", ABCD, ""),
    ("ambiguous_full_option_list", "A. Red\nB. Green\nC. Blue\nD. Yellow", ABCD, ""),
    ("ambiguous_list_with_final_answer", "A. Red\nB. Green\nC. Blue\nD. Yellow\nAnswer: C", ABCD, "C"),
    ("ambiguous_reasoning_multiple_mentions", "I compared A and B; neither can be ruled out.", ABCD, ""),
    ("ambiguous_two_trailing_lines", "There are two possibilities.\nB\nD", ABCD, ""),
    ("ambiguous_comma_option_list", "Options A, B, C, D", ABCD, ""),
    ("boundary_word_colon", "This is a banana: the fruit is yellow.", ABCD, ""),
    ("boundary_word_right_paren", "The label says cubic) in the caption.", ABCD, ""),
    ("boundary_underscore_identifier", "field_B is missing.", ABCD, ""),
    ("boundary_digit_identifier", "The camera model is B2.", ABCD, ""),
    ("boundary_decimal_version", "Version 1.b is installed.", ABCD, ""),
    ("boundary_url_path", "See https://example.org/B.", ABCD, ""),
    ("boundary_email", "Contact b@example.org.", ABCD, ""),
    ("boundary_chinese_embedded", "图B显示了结果。", ABCD, ""),
    ("boundary_accented_right", "Bé.", ABCD, ""),
    ("boundary_uppercase_variable_end", "the value of C", ABCD, ""),
    ("boundary_vitamin_end", "Vitamin B", ABCD, ""),
    ("boundary_single_uppercase_middle", "The diagram labels B near the axis.", ABCD, ""),
    ("boundary_fullwidth_choice", "Ｂ", ABCD, ""),
    ("boundary_unpaired_underscore", "_B", ABCD, ""),
    ("boundary_parenthesized_url", "See https://example.org/(B)", ABCD, ""),
    ("custom_extended_i", "I", "ABCDEFGHIJKLMN", "I"),
    ("custom_extended_k_box", "\\boxed{k}", "ABCDEFGHIJKLMN", "K"),
    ("custom_lowercase_choices", "Answer: B", "abc", "B"),
    ("custom_sparse_z", "I choose z.", "XZ", "Z"),
    ("custom_sparse_invalid_final", "Answer: X. Final answer: A", "XZ", ""),
    ("custom_five_options_f_rejected", "Answer: F", "ABCDE", ""),
    ("custom_noncontiguous_f", "I choose f.", "ACF", "F"),
    ("article_lower_noun", "a dog is visible near the fence.", ABCD, ""),
    ("article_uppercase_noun", "A bus is parked beside the road.", ABCD, ""),
    ("article_a_is_correct", "A is correct because the diagram has three sides.", ABCD, "A"),
    ("article_a_seems_correct", "A seems correct given the reflection.", ABCD, "A"),
    ("article_lower_a_because", "a because two circles are shown.", ABCD, "A"),
    ("article_a_noun_with_is", "A cat is sitting on the table.", ABCD, ""),
    ("article_punctuated_article_text", "A. A cat is sitting on the table.", ABCD, "A"),
    ("model_reply_spatial_choice",
     "The lamp is behind the sofa, so I choose C. The letters A and D printed in the figure are annotations.", ABCD, "C"),
    ("model_reply_refuse_after_distractors",
     "The figure contains labels A and C, but the image is too blurred to identify the correct option.", ABCD, ""),
    ("model_reply_option_restatement",
     "A. Two birds\nB. Three birds\nC. Four birds\nD. Five birds\nI count four birds. Final answer: C.", ABCD, "C"),
    ("model_reply_box_after_reasoning",
     "The left column has three filled squares and the right has one. Therefore the difference is two. \\boxed{b}", ABCD, "B"),
    ("model_reply_corrected_count",
     "I initially thought the answer is A. Looking closer, a fourth wheel is visible. The answer is D.", ABCD, "D"),
    ("model_reply_no_choice_after_answer", "A might fit the first panel. Final answer: I cannot tell.", ABCD, ""),
    ("hack_mmmu_bracket_over_final", "The diagram labels an earlier candidate (A). The answer is B.", ABCD, "B"),
    ("hack_mmmu_invalid_final", "B was an earlier candidate. The answer is Z.", ABCD, ""),
    ("hack_mmmu_option_echo", "(A) red\n(B) blue\n(C) green\n(D) yellow", ABCD, ""),
    ("hack_mmmu_eight_choice_container", "The draft references (A). <answer>h</answer>", "ABCDEFGH", "H"),
    ("hack_mmmu_pro_embedded_j", "Answer: JUNK", "ABCDEFGHIJ", ""),
    ("hack_mmmu_pro_invalid_container", "(B) is an earlier candidate. Answer: <answer>Z</answer>", "ABCDEFGHIJ", ""),
    ("hack_mmmu_pro_lowercase_correction", "Answer: C\nActually, the answer is j.", "ABCDEFGHIJ", "J"),
    ("hack_videommmu_colon_over_final", "(D) was a draft.\nB: tentative.\nThe answer is C", ABCD, "C"),
    ("hack_videommmu_alternatives_after_colon", "A: earlier draft.\nAnswer: B/C", ABCD, ""),
    ("hack_videommmu_five_choice_container", "(E) was a previous candidate. <answer>a</answer>", "ABCDE", "A"),
    ("hack_mmbench_unoffered_e", "E", ABCD, ""),
    ("hack_mmbench_short_article", "A cat", ABCD, ""),
    ("hack_mmbench_mixed_punctuation_alternatives", "B or C.", ABCD, ""),
    ("hack_mmbench_option_text_over_lowercase",
     "The label ID_C is incidental. Answer: b because the object is red", ABCD, "B"),
    ("hack_seedbench_concatenated_alphabet", "ABCD", ABCD, ""),
    ("hack_seedbench_negated_leading_choice", "B is not my selection.", ABCD, ""),
    ("hack_seedbench_article", "A close-up view of a triangle.", ABCD, ""),
    ("hack_seedbench_slash_alternatives", "\n B/C \n", ABCD, ""),
    ("hack_ai2d_option_echo", "B. blue\nC. green\nD. yellow", ABCD, ""),
    ("hack_ai2d_scoped_lowercase", "B. Earlier draft.\n<answer>c</answer>", ABCD, "C"),
    ("hack_ai2d_final_alternatives", "A. Earlier draft.\nAnswer: D or B", ABCD, ""),
    ("hack_ai2d_unoffered_leading_label", "E. A label absent from the offered options.", ABCD, ""),
]


@pytest.mark.parametrize("response, choices, expected", [case[1:] for case in LMMS_EVAL_CASES],
                         ids=[case[0] for case in LMMS_EVAL_CASES])
def test_lmms_eval_rule_follows_its_cases(response, choices, expected):
    assert lmms_eval_choice(response, None if choices is None else list(choices)) == (expected or None)


# Worked by hand from extract_characters_regex: delete the lead-ins (case-sensitive, anywhere, in order; the
# list misses two commas, so "The best option isThe correct option is" and "Best answer:Best option:" are
# single entries), then take the first capital A-D anywhere.
@pytest.mark.parametrize("reply, letter", [
    ("B", "B"),
    ("\nB\n", "B"),
    ("The answer is B.", "B"),
    ("The best answer is: D", "D"),
    ("Best answer: C", "B"),  # "Best answer:" alone is no lead-in: the B of "Best"
    ("Best answer:Best option: C", "C"),  # the joined entry, deleted
    ("Best answer:The answerBest option: D", "D"),  # deleting "The answer" joins the last entry, deleted next
    ("The best option isThe correct option is D", "D"),
    ("Answer: C", "A"),  # the A of "Answer"
    ("Dogs are cute", "D"),  # letters inside words count
    ("A dog runs", "A"),  # so does the article
    ("I think it's D", "D"),
    ("CD", "C"),  # the first one
    ("b", None),  # lowercase never counts
    ("(c) red", None),
    ("The answer is E", None),  # only A-D
    ("None of these", None),
    ("there is not one capital letter from the options in this reply of twelve words", None),  # > 10 words
    ("the video shows a man who walks along the beach and then turns, so C", "C"),  # > 10 words with C
])
def test_lmms_eval_legacy_rule(reply, letter):
    assert lmms_eval_legacy_choice(reply, list(ABCD)) == letter


def test_lmms_eval_legacy_rule_reads_a_to_d_whatever_the_choices():
    assert lmms_eval_legacy_choice("D", ["A", "B"]) == "D" and lmms_eval_legacy_choice("E", list("ABCDE")) is None


@pytest.mark.parametrize("reply, letter", [
    ("B", "B"), ("B.", "B"), ("(B) dog", "B"), ("The answer is C.", "C"), ("Answer: D", "D"), ("option a", "A"),
    ("  c) red", "C"), ("I think it's B", "B"), ("None of these", None), ("", None), ("A dog runs", None),
    ("A", "A"), ("A.", "A"), ("a", "A"), ("A. red", "A"), ("A is correct", "A"), ("The answer is A dog", "A"),
    ("The best answer is: D", "D"), ("Best answer: C", "C"), ("Answer: Option B", "B"),
    ("The correct option is (D)", "D"),
    ("**B**", "B"), ("[C]", "C"), ("B and C", "B"), ("It's A", "A"), ("a dog", None), ("Dogs are cute", None),
    ("CD", None), ("\nD\n", "D"), ("The answer is b", "B"),
])
def test_extract_answer_letter(reply, letter):
    assert extract_answer_letter(reply) == letter
    assert SCORING["strict"](reply, list(ABCD)) == letter


@pytest.mark.parametrize("reply, lmms_eval, legacy, strict", [
    ("The answer is B.", "B", "B", "B"),
    ("Best answer: C", "C", "B", "C"),
    ("I think it's D", None, "D", "D"),
    ("A dog runs", None, "A", None),
    ("B and C", None, "B", "B"),
    ("<answer>c</answer>", "C", None, None),
])
def test_the_three_rules(reply, lmms_eval, legacy, strict):
    assert DEFAULT_SCORING == "lmms-eval" and list(SCORING) == ["lmms-eval", "lmms-eval-legacy", "strict"]
    assert [SCORING[rule](reply, list(ABCD)) for rule in SCORING] == [lmms_eval, legacy, strict]
