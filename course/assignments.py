"""The assignments assign.py hands out: which functions each stubs, what it teaches, which tests
grade it, and the expected student time. Edit this list to add one;
`python -m course.assign --verify` checks every grader list against a stubbed copy (rerun it after
changing the tests)."""

# Tests that stop when anything the model or the training loop needs is missing: a stubbed piece on
# that path fails them too, so they are among its graders.
# FDT runs of train.py, evaluated; test_end_to_end has both heads
TRAINING = ["tests/test_train.py::test_ddp_two_processes_equal_one",
            "tests/test_train.py::test_extend_a_finished_run_on_purpose",
            "tests/test_train.py::test_mismatched_resume_names_every_difference",
            "tests/test_train.py::test_non_finite_loss_stops_and_keeps_last_good_checkpoint",
            "tests/test_train.py::test_recipe_mechanics_frozen_stem_clamp_and_no_clipping",
            "tests/test_train.py::test_resume_after_ctrl_c_is_exact",
            "tests/test_run_folder.py::test_second_run_on_the_same_folder_refused"]
# trains; eval fails on purpose
TRAINING_NO_EVAL = ["tests/test_run_folder.py::test_evaluation_error_keeps_the_checkpoint"]
# every user of the `trained` fixture
TRAINED_MODEL = [f"tests/test_eval.py::{t}" for t in (
    "test_binding_tests_and_cli", "test_classifier_is_the_normalised_template_mean",
    "test_classnames_file",
    "test_evaluate_and_retrieval_cli", "test_foreign_and_newer_checkpoints_and_projection_head",
    "test_imagefolder_matches_a_direct_computation", "test_inspect_image_and_text",
    "test_inspect_shapes_defaults",
    "test_missing_datasets_say_what_to_put_where", "test_sugarcrepe_against_a_brute_force_count",
    "test_zeroshot_beats_chance_on_shapes", "test_zeroshot_cli_shapes_top1_and_top5")]
# the FDT head's forward
FDT_MODEL = [f"tests/test_model.py::{t}" for t in (
    "test_a_few_steps_lower_the_loss[fdt]", "test_loss_at_init_near_log_batch[fdt]",
    "test_shapes_for_every_preset_and_head[fdt-base]",
    "test_shapes_for_every_preset_and_head[fdt-small]",
    "test_shapes_for_every_preset_and_head[fdt-tiny]", "test_text_features_ignore_padding")]
BENCH = ["tests/test_bench.py::test_flop_count_lists_both_heads_and_fdt_costs_more",
         "tests/test_bench.py::test_quick_run_prints_every_row"]
# fdt.FDT end to end
FDT_LAYER = [f"tests/test_fdt.py::{t}" for t in (
    "test_fdt_gradients_flow_to_tokens_and_queries", "test_fdt_padding_invariance",
    "test_fdt_under_bfloat16_autocast",
    "test_fdt_weights_and_embedding", "test_negative_relevance_caption_not_captured_by_pads")]


def fdt_tests(*names):
    return [f"tests/test_fdt.py::{n}" for n in names]


# name -> teaches (one line), functions ("file.py:Qualname"), graders (pytest node ids; an id
# without its [parameters] stands for all of them), minutes (expected student time, reading
# included).
# The graders are exactly the tests that fail once the functions are stubbed (and pass on the
# reference), as `python -m course.assign --verify` finds them; rerun it after changing the tests.
ASSIGNMENTS = {
    "sparsemax-threshold": dict(
        teaches="sparsemax's forward: the threshold tau from a descending sort "
                "(Martins & Astudillo 2016, Alg. 1)",
        functions=["fdt.py:threshold_from_sorted", "fdt.py:threshold_sort"],
        graders=fdt_tests("test_sparsemax_matches_bisection_reference_on_every_dim",
                          "test_sparsemax_is_sparse_and_inf_gets_exact_zero",
                          "test_sparsemax_low_precision_input",
                          "test_sparsemax_gradcheck_float64",
                          "test_sparsemax_backward_matches_jacobian",
                          "test_fast_sparsemax_matches_sort_reference",
                          "test_fast_sparsemax_support_sizes_around_k",
                          "test_fast_sparsemax_dtypes",
                          "test_fdt_forward_matches_plain_composite[sparsemax]")
        + FDT_LAYER
        + ["tests/test_graders.py::test_sparsemax_gradient_is_the_jacobian_product",
           "tests/test_faults.py::test_sparsemax_rows_without_a_finite_entry_are_a_clear_error"]
        + FDT_MODEL + TRAINED_MODEL + TRAINING + TRAINING_NO_EVAL
        + ["tests/test_train.py::test_end_to_end[fdt]"]
        + BENCH,
        minutes=45,
    ),
    "sparsemax-backward": dict(
        teaches="an analytic vector-Jacobian product in a torch.autograd.Function: "
                "g minus its mean over the support",
        functions=["fdt.py:SparsemaxFunction.backward"],
        graders=fdt_tests("test_sparsemax_gradcheck_float64",
                          "test_sparsemax_backward_matches_jacobian",
                          # it checks the fast gradient too
                          "test_fast_sparsemax_matches_sort_reference",
                          "test_fdt_forward_matches_plain_composite[sparsemax]",
                          "test_fdt_gradients_flow_to_tokens_and_queries",
                          "test_fdt_under_bfloat16_autocast")
        + ["tests/test_graders.py::test_sparsemax_gradient_is_the_jacobian_product",
           "tests/test_model.py::test_a_few_steps_lower_the_loss[fdt]"]
        + TRAINED_MODEL + TRAINING + TRAINING_NO_EVAL
        + ["tests/test_train.py::test_end_to_end[fdt]"] + BENCH,
        minutes=30,
    ),
    "fdt-pooling": dict(
        teaches="FDT Eq. 1-2: relevance max-pooled over positions, pads at -inf "
                "(not the official 0/1 mask)",
        functions=["fdt.py:FDT.pooled_relevance"],
        # training uses fdt_fast.FDT's own pooling, so only the tests of the plain layer, the
        # equivalence tests and bench's plain-vs-fast rows depend on this one
        graders=FDT_LAYER + fdt_tests("test_fdt_forward_matches_plain_composite",
                                      "test_fdt_softmax_mode_is_dense_and_normalised",
                                      "test_max_pooled_relevance_matches_plain_autograd")
        + ["tests/test_faults.py::test_fp16_overflow_of_relevances_is_not_silent",
           "tests/test_bench.py::test_quick_run_prints_every_row"],
        minutes=20,
    ),
    "fdt-layer": dict(
        teaches="FDT Eq. 3-4: sparsemax (or softmax) weights over the bank, "
                "the embedding as their weighted sum",
        functions=["fdt.py:FDT.forward", "fdt.py:FDT.activate"],
        graders=FDT_LAYER + fdt_tests("test_fdt_forward_matches_plain_composite",
                                      "test_fdt_softmax_mode_is_dense_and_normalised")
        + ["tests/test_faults.py::test_fdt_all_padding_row_is_a_clear_error",
           "tests/test_faults.py::test_fp16_overflow_of_relevances_is_not_silent"]
        + FDT_MODEL + TRAINED_MODEL + TRAINING + TRAINING_NO_EVAL
        + ["tests/test_train.py::test_end_to_end[fdt]"]
        + BENCH,
        minutes=20,
    ),
    "contrastive-loss": dict(
        teaches="symmetric InfoNCE with a learned temperature, "
                "and its per-process form for a gathered batch",
        functions=["model.py:contrastive_loss"],
        graders=["tests/test_graders.py::test_contrastive_loss_is_the_mean_of_both_directions",
                 "tests/test_graders.py::test_contrastive_loss_split_over_processes_adds_up",
                 "tests/test_model.py::test_contrastive_loss_matches_by_hand",
                 "tests/test_model.py::test_loss_at_init_near_log_batch",
                 "tests/test_model.py::test_a_few_steps_lower_the_loss"]
        + TRAINED_MODEL + TRAINING + TRAINING_NO_EVAL + ["tests/test_train.py::test_end_to_end"]
        + BENCH,
        minutes=30,
    ),
    "retrieval-recall": dict(
        teaches="recall@1/5/10 both ways under the 5-captions protocol, "
                "ties counted against the model",
        functions=["lib/metrics.py:retrieval_metrics"],
        graders=["tests/test_graders.py::test_recall_counts_a_right_answer_at_rank_k_as_a_miss",
                 "tests/test_eval.py::test_retrieval_metrics_match_brute_force",
                 "tests/test_eval.py::test_perfect_embeddings_score_100",
                 "tests/test_eval.py::test_known_ranks_give_known_recalls",
                 "tests/test_eval.py::test_evaluate_and_retrieval_cli"]
        # train.py evaluates as it goes
        + TRAINING + ["tests/test_train.py::test_end_to_end"],
        minutes=45,
    ),
    "lr-schedule": dict(
        teaches="linear warm-up then cosine decay to 0, as a pure function of the step",
        functions=["train.py:lr_at"],
        graders=[
            "tests/test_graders.py::test_lr_warmup_is_linear_and_reaches_peak_on_its_last_step",
            "tests/test_graders.py::test_lr_cosine_shape_and_zero_at_the_end",
            "tests/test_train.py::test_lr_schedule",
            "tests/test_train.py::test_warmup_from_a_start_lr"]
        + TRAINING + TRAINING_NO_EVAL + ["tests/test_train.py::test_end_to_end"],
        minutes=15,
    ),
    "zeroshot-classifier": dict(
        teaches="prompt ensembling (Radford et al. 2021, 3.1.4): "
                "average normalised template embeddings, renormalise",
        functions=["lib/metrics.py:zeroshot_classifier"],
        # the shapes zero-shot that train.py runs builds its classifier from shapes' prompts instead
        graders=["tests/test_eval.py::test_classifier_is_the_normalised_template_mean",
                 "tests/test_eval.py::test_imagefolder_matches_a_direct_computation"],
        minutes=15,
    ),
}
