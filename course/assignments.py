"""The assignments assign.py hands out: which functions each stubs, what it teaches, which tests
grade it, how long a student and the grading take. Edit this list to add one;
`python -m course.assign --verify` re-derives every grader list from stubbed copies (rerun it after
changing the tests).

Graders are test function names, not node ids: a name stands for every parameter set of that
test, whatever file holds it, so moving a test to another file or renaming its parameters changes
nothing. Grading finds the names at grade time and says so when one is no longer collected.
"""

# Tests that stop when anything the model or the training loop needs is missing: a stubbed piece on
# that path fails them too, so they are among its graders. They take most of the grading time.
# runs of train.py that evaluate the model (test_end_to_end has both heads)
TRAINED_AND_EVALUATED = [
    "test_end_to_end", "test_ddp_two_processes_equal_one",
    "test_a_run_that_ends_inside_its_warmup_is_warned",
    "test_a_training_step_reads_nothing_back_and_feeds_contiguous_batches",
    "test_an_out_with_a_checkpoint_is_resumed_or_overwritten_on_purpose",
    "test_ctrl_c_during_the_final_evaluation_finishes_the_run",
    "test_damaged_metrics_stop_the_resume_and_lose_nothing",
    "test_extend_a_finished_run_on_purpose", "test_mismatched_resume_names_every_difference",
    "test_non_finite_loss_stops_and_keeps_last_good_checkpoint",
    "test_recipe_mechanics_frozen_stem_clamp_and_no_clipping", "test_resume_after_ctrl_c_is_exact",
    "test_resume_is_checked_before_any_data_is_read", "test_resume_names_a_changed_training_split",
    "test_second_run_on_the_same_folder_refused",
    "test_sigterm_from_outside_saves_and_says_how_to_resume",
    "test_the_readable_fdt_trains_as_the_fast_one"]
# every run of train.py: those, and those stopped before they evaluate
TRAINING = TRAINED_AND_EVALUATED + [
    "test_evaluation_error_keeps_the_checkpoint",
    "test_sigterm_checkpoints_like_ctrl_c_and_restores_the_handlers",
    "test_two_ranks_build_the_cache_once_and_stop_at_one_step"]
# tests/test_eval.py's `trained` model (trained by its own loop, not train.py) and the probe CLI
TRAINED_MODEL = ["test_binding_tests_and_cli", "test_classifier_is_the_normalised_template_mean",
                 "test_classnames_file", "test_evaluate_and_retrieval_cli",
                 "test_foreign_and_newer_checkpoints_and_projection_head",
                 "test_imagefolder_matches_a_direct_computation", "test_inspect_image_and_text",
                 "test_inspect_shapes_defaults", "test_missing_datasets_say_what_to_put_where",
                 "test_sugarcrepe_against_a_brute_force_count",
                 "test_zeroshot_beats_chance_on_shapes", "test_zeroshot_cli_shapes_top1_and_top5",
                 "test_probe_cli_fits_on_training_labels_and_scores_single_objects"]
# the FDT head's forward in the model and a few steps of it
FDT_MODEL = ["test_shapes_for_every_preset_and_head", "test_text_features_ignore_padding",
             "test_loss_at_init_near_log_batch", "test_a_few_steps_lower_the_loss",
             "test_fp16_loss_scale_lets_the_first_steps_update_the_weights"]
# eval.py on an FDT checkpoint of its own
FDT_EVAL = ["test_read_only_checkpoint_folder_shows_results_then_one_line",
            "test_unreadable_imagefolder_images_named"]
BENCH = ["test_flop_count_lists_both_heads_and_fdt_costs_more", "test_quick_run_prints_every_row"]
# fdt.FDT end to end
FDT_LAYER = ["test_fdt_weights_and_embedding", "test_fdt_padding_invariance",
             "test_negative_relevance_caption_not_captured_by_pads",
             "test_fdt_gradients_flow_to_tokens_and_queries", "test_fdt_under_bfloat16_autocast"]

# name -> teaches (one line); functions ("file.py:Qualname"), stubbed in a student copy and taken
# from a submission; graders (test function names, the quick ones that test the function itself
# first); minutes (expected student time, reading included); seconds (grading the reference alone,
# measured on an idle 2-core AMD EPYC: the default time limit is a multiple of it). A student copy
# must not hold an assignment's answer elsewhere: copy_plain lists fast kernels whose copy calls the
# plain method they override (so the copy trains the student's code), copy_hidden the kernels left
# out of the copy (their tests fail there, and run against the instructor's kernels at grading).
ASSIGNMENTS = {
    "sparsemax-threshold": dict(
        teaches="sparsemax's forward: the threshold tau from a descending sort "
                "(Martins & Astudillo 2016, Alg. 1)",
        functions=["fdt.py:threshold_from_sorted", "fdt.py:threshold_sort"],
        graders=["test_sparsemax_is_sparse_and_inf_gets_exact_zero",
                 "test_sparsemax_row_without_a_finite_entry_is_nan_where_nothing_checks",
                 "test_sparsemax_matches_bisection_reference_on_every_dim",
                 "test_sparsemax_low_precision_input", "test_sparsemax_gradcheck_float64",
                 "test_sparsemax_backward_matches_jacobian",
                 "test_sparsemax_gradient_is_the_jacobian_product",
                 "test_sparsemax_rows_without_a_finite_entry_are_a_clear_error",
                 "test_fast_sparsemax_matches_sort_reference",
                 "test_fast_sparsemax_support_sizes_around_k", "test_fast_sparsemax_dtypes",
                 "test_fast_sparsemax_sorts_at_once_when_the_support_is_large",
                 "test_fdt_forward_matches_plain_composite",
                 "test_the_fdt_layer_compiles_to_one_graph"]
        + FDT_LAYER + FDT_MODEL + FDT_EVAL + TRAINED_MODEL + TRAINING + BENCH,
        minutes=45,
        seconds=82,
    ),
    "sparsemax-backward": dict(
        teaches="an analytic vector-Jacobian product in a torch.autograd.Function: "
                "g minus its mean over the support",
        functions=["fdt.py:SparsemaxFunction.backward"],
        graders=["test_sparsemax_gradient_is_the_jacobian_product",
                 "test_sparsemax_backward_matches_jacobian", "test_sparsemax_gradcheck_float64",
                 # they check the fast gradient too
                 "test_fast_sparsemax_matches_sort_reference",
                 "test_fast_sparsemax_sorts_at_once_when_the_support_is_large",
                 "test_fdt_forward_matches_plain_composite",
                 "test_fdt_gradients_flow_to_tokens_and_queries",
                 "test_fdt_under_bfloat16_autocast", "test_the_fdt_layer_compiles_to_one_graph",
                 "test_a_few_steps_lower_the_loss",
                 "test_fp16_loss_scale_lets_the_first_steps_update_the_weights"]
        + TRAINED_MODEL + TRAINING + BENCH,
        minutes=30,
        seconds=89,
    ),
    "fdt-pooling": dict(
        teaches="FDT Eq. 1-2: relevance max-pooled over positions, pads at -inf "
                "(not the official 0/1 mask)",
        functions=["fdt.py:FDT.pooled_relevance"],
        # training uses fdt_fast.FDT's own pooling, so only the tests of the plain layer, the
        # equivalence tests, bench's plain-vs-fast rows and a run of the plain layer depend on it
        graders=["test_plain_pooling_is_the_max_over_real_positions_without_the_fast_kernel"]
        + FDT_LAYER + ["test_fdt_forward_matches_plain_composite",
                       "test_fdt_softmax_mode_is_dense_and_normalised",
                       "test_max_pooled_relevance_matches_plain_autograd",
                       "test_fp16_overflow_of_relevances_is_not_silent",
                       "test_quick_run_prints_every_row",
                       "test_the_readable_fdt_trains_as_the_fast_one"],
        minutes=20,
        seconds=14,
        copy_plain=["lib/fdt_fast.py:FDT.pooled_relevance"],
        copy_hidden=["lib/fdt_fast.py:MaxPooledRelevance.forward"],
    ),
    "fdt-layer": dict(
        teaches="FDT Eq. 3-4: sparsemax (or softmax) weights over the bank, "
                "the embedding as their weighted sum",
        functions=["fdt.py:FDT.forward", "fdt.py:FDT.activate"],
        graders=FDT_LAYER + ["test_fdt_forward_matches_plain_composite",
                             "test_fdt_softmax_mode_is_dense_and_normalised",
                             "test_fdt_all_padding_row_is_a_clear_error",
                             "test_fp16_overflow_of_relevances_is_not_silent",
                             "test_the_fdt_layer_compiles_to_one_graph"]
        + FDT_MODEL + FDT_EVAL + TRAINED_MODEL + TRAINING + BENCH,
        minutes=20,
        seconds=89,
        copy_plain=["lib/fdt_fast.py:FDT.activate"],
    ),
    "contrastive-loss": dict(
        teaches="symmetric InfoNCE with a learned temperature, "
                "and its per-process form for a gathered batch",
        functions=["model.py:contrastive_loss"],
        graders=["test_contrastive_loss_is_the_mean_of_both_directions",
                 "test_contrastive_loss_split_over_processes_adds_up",
                 "test_contrastive_loss_matches_by_hand", "test_loss_at_init_near_log_batch",
                 "test_a_few_steps_lower_the_loss",
                 "test_fp16_loss_scale_lets_the_first_steps_update_the_weights",
                 "test_non_finite_loss_before_any_checkpoint_names_none"]
        + TRAINED_MODEL + TRAINING + BENCH,
        minutes=30,
        seconds=93,
    ),
    "retrieval-recall": dict(
        teaches="recall@1/5/10 both ways under the 5-captions protocol, "
                "ties counted against the model",
        functions=["lib/metrics.py:retrieval_metrics"],
        # train.py evaluates as it goes
        graders=["test_recall_counts_a_right_answer_at_rank_k_as_a_miss",
                 "test_known_ranks_give_known_recalls",
                 "test_retrieval_metrics_match_brute_force",
                 "test_retrieval_with_shared_captions_matches_brute_force",
                 "test_perfect_embeddings_score_100", "test_evaluate_and_retrieval_cli",
                 "test_read_only_checkpoint_folder_shows_results_then_one_line"]
        + TRAINED_AND_EVALUATED,
        minutes=45,
        seconds=69,
    ),
    "lr-schedule": dict(
        teaches="linear warm-up then cosine decay to 0, as a pure function of the step",
        functions=["train.py:lr_at"],
        graders=["test_lr_warmup_is_linear_and_reaches_peak_on_its_last_step",
                 "test_lr_cosine_shape_and_zero_at_the_end", "test_lr_schedule",
                 "test_warmup_from_a_start_lr",
                 "test_non_finite_loss_before_any_checkpoint_names_none"] + TRAINING,
        minutes=15,
        seconds=69,
    ),
    "zeroshot-classifier": dict(
        teaches="prompt ensembling (Radford et al. 2021, 3.1.4): "
                "average normalised template embeddings, renormalise",
        functions=["lib/metrics.py:zeroshot_classifier"],
        # the shapes zero-shot that train.py runs builds its classifier from shapes' prompts instead
        graders=["test_zeroshot_classifier_is_the_renormalised_template_mean",
                 "test_classifier_is_the_normalised_template_mean",
                 "test_imagefolder_matches_a_direct_computation"],
        minutes=15,
        seconds=14,
    ),
}
