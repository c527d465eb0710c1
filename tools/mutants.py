"""Planted bugs that the test suite must catch: a mutation check you can re-run (issue 33).

    python tools/mutants.py                  # every mutant: a table, exit 1 if one is not caught
    python tools/mutants.py --list           # the mutants and the tests that should catch them
    python tools/mutants.py --only choose-always-best warmup-uncapped

Each mutant is a bug a user would meet (a best checkpoint that is the last one, a resume that
silently starts over, bf16 that never computes in bf16, ...), written as an exact text edit of one
or more files. For each, this script copies the tree once into a temporary folder, applies the
edit there (never here), runs only the tests that should catch it (pytest -x), and restores the
file. "caught" means those tests failed on the mutant; a baseline run first checks that they pass
on the unmutated tree, so a failure is the mutant's doing. An edit whose text is not found exactly
once is an error: the list is out of date with the code.

Why a curated list and not mutmut or cosmic-ray: they generate thousands of mechanical mutants
(every operator, every constant) and run the suite on each; here a single test starts train.py
processes, so on two CPU cores that is days. A short list of the bugs that matter, each with the
few tests that guard it, runs in minutes and says exactly which promise each test keeps.

Needs CIFAR10_ROOT (and RESNET50_WEIGHTS for the tests that use it), like the suite.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache", "log", "checkpoints",
                                     "cache", "cifar", "results", "docs", "*.pth")


@dataclass
class Mutant:
    name: str
    why: str  # the bug, as a user would meet it
    edits: list  # (file, old text, new text): each old text must occur exactly once
    tests: list  # pytest node ids that must fail on it


T = "tests/"
MUTANTS = [
    # -- the eight of issue 33 -----------------------------------------------------------------
    Mutant("choose-always-best", "the best checkpoint is always the last epoch's",
           [("checkpoints.py", "is_best = val_acc > self.best_acc or epoch ==", "is_best = True or epoch ==")],
           [T + "test_train.py::test_the_best_epoch_not_the_last_is_kept_and_tested"]),
    Mutant("resume-restarts", "--resume silently starts again from scratch (fresh model, optimiser, step 0)",
           [("train.py", "    if ckpt:\n        model, model_cfg = checkpoints.model_from_checkpoint",
             "    if False:\n        model, model_cfg = checkpoints.model_from_checkpoint"),
            ("train.py", 'args, model, len(loaders["train"]), ckpt, fused=rt.cuda)',
             'args, model, len(loaders["train"]), None, fused=rt.cuda)')],
           [T + "test_resume_exact.py::test_pil_mid_epoch_resume_is_bit_identical_fast"]),
    Mutant("bf16-never-autocast", "--precision bf16 says bf16 but computes in float32",
           [("utils.py", 'torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"',
             'torch.autocast(device.type, dtype=torch.bfloat16) if precision == "never"')],
           [T + "test_long_runs.py::test_bf16_precision_trains_on_the_cpu_like_float32"]),
    Mutant("micro-batch-never-splits", "--micro-batch says chunks but runs the whole batch",
           [("engine.py", "if not micro_batch or micro_batch >= len(y):", "if True:")],
           [T + "test_long_runs.py::test_micro_batch_run_resumes_bit_identical_and_logs_its_chunks"]),
    Mutant("warmup-uncapped", "a short run spends half of itself warming up",
           [("engine.py", "warmup = min(WARMUP_EPOCHS * steps_per_epoch, total // 10)",
             "warmup = WARMUP_EPOCHS * steps_per_epoch")],
           [T + "test_engine.py::test_warmup_is_at_most_a_tenth_of_a_short_run"]),
    Mutant("head-cbam-reduction-8", "the attention head is not the README's (+28,800 parameters)",
           [("models.py", "nn.ReLU(inplace=True), ResAttention(attention_dim)]",
             "nn.ReLU(inplace=True), ResAttention(attention_dim, reduction=8)]")],
           [T + "test_models.py::test_parameter_counts_are_the_readmes"]),
    Mutant("sgd-without-nesterov", "the fine-tuned models train with plain momentum",
           [("engine.py", "nesterov=True", "nesterov=False")],
           [T + "test_engine.py::test_each_model_trains_with_its_own_defaults"]),
    Mutant("weights-v1-v2-swapped", "--weights imagenet loads the V2 recipe, not the seed's V1",
           [("models.py", '"imagenet": torchvision.models.ResNet50_Weights.IMAGENET1K_V1',
             '"imagenet": torchvision.models.ResNet50_Weights.IMAGENET1K_V2')],
           [T + "test_models.py::test_weights_flags_ask_torchvision_for_the_named_weights"]),
    Mutant("label-smoothing-ignored", "--label-smoothing changes nothing",
           [("engine.py", "CrossEntropyLoss(label_smoothing=args.label_smoothing)", "CrossEntropyLoss()")],
           [T + "test_engine.py::test_each_model_trains_with_its_own_defaults"]),
    Mutant("val-every-skips-the-last", "--val-every 2 over 5 epochs never validates the last one",
           [("train.py", "if (epoch + 1) % args.val_every == 0 or epoch + 1 == args.epochs:",
             "if (epoch + 1) % args.val_every == 0:")],
           [T + "test_train.py::test_val_every_validates_those_epochs_and_the_last"]),
    Mutant("compiled-keys-in-checkpoint", "a --compile run saves torch.compile's _orig_mod. keys",
           [("train.py", "saver = checkpoints.Checkpointer(model, model_cfg,", "saver = checkpoints.Checkpointer(net, model_cfg,")],
           [T + "test_train.py::test_compiled_run_stops_resumes_exactly_and_evaluates"]),
    Mutant("step-reads-nonzero", "the training step counts correct predictions on the host (nonzero)",
           [("engine.py", "(logits.argmax(1) == y).sum().double()",
             "torch.tensor(float(len((logits.argmax(1) == y).nonzero())), dtype=torch.float64, device=y.device)")],
           [T + "test_engine.py::test_the_training_step_never_reads_the_device"]),
    Mutant("step-copies-to-cpu", "the training step copies its loss to the CPU",
           [("engine.py", "        total = loss.detach()\n", '        total = loss.detach().to("cpu")\n')],
           [T + "test_engine.py::test_the_training_step_never_reads_the_device"]),
    Mutant("step-boolean-mask", "the training step indexes with a boolean mask",
           [("engine.py", "        self.count += len(y)\n", "        self.count += len(y[y >= 0])\n")],
           [T + "test_engine.py::test_the_training_step_never_reads_the_device"]),
    # -- ten more, in the rooms that matter most -------------------------------------------------
    Mutant("ddp-predictions-out-of-order", "under torchrun the test predictions come back rank by rank",
           [("engine.py", "whole[k][r::world] = part", "whole[k][r * len(part):(r + 1) * len(part)] = part")],
           [T + "test_ddp.py::test_validation_reduced_over_ranks_equals_one_process"]),
    Mutant("val-overlaps-train", "the validation images are trained on too",
           [("data.py", "train = np.setdiff1d(np.arange(len(labels)), val)", "train = np.arange(len(labels))")],
           [T + "test_data.py::test_split_train_val"]),
    Mutant("eval-drops-last-batch", "evaluation silently skips the last partial batch",
           [("data.py", "return num_batches(len(self.images), self.batch_size, self.train)",
             "return num_batches(len(self.images), self.batch_size, True)")],
           [T + "test_data.py::test_tensor_loader_eval_covers_every_image_once"]),
    Mutant("crop-scale-imagenet", "the seed's crop scale (0.8, 1.0) becomes torchvision's default (0.08, 1.0)",
           [("data.py", "CROP_SCALE = (0.8, 1.0)", "CROP_SCALE = (0.08, 1.0)")],
           [T + "test_data.py::test_draw_crops_against_torchvision_get_params",
            T + "test_data.py::test_draw_crops_distribution"]),
    Mutant("cache-key-ignores-size", "features cached at 64 px are reused at 224 px",
           [("features.py", '        "image_size": int(image_size),\n', "")],
           [T + "test_features.py::test_the_key_changes_with_what_changes_the_features"]),
    Mutant("cache-crc-unchecked", "a damaged feature chunk is trained on",
           [("features.py", "    def bad_chunks(self, done, kinds):\n",
             "    def bad_chunks(self, done, kinds):\n        return []\n")],
           [T + "test_features.py::test_a_damaged_chunk_is_recomputed_with_a_warning"]),
    Mutant("resume-changes-model", "--resume with another --model is accepted",
           [("checkpoints.py", "        if key in given and getattr(args, key) != saved:",
             "        if False:")],
           [T + "test_train.py::test_resume_with_another_model_fails_in_one_line"]),
    Mutant("mcnemar-one-sided", "McNemar's p-value is one-sided: half the true p",
           [("stats.py", "stats.binomtest(int(only_a), int(only_a + only_b), 0.5).pvalue",
             'stats.binomtest(int(only_a), int(only_a + only_b), 0.5, alternative="less").pvalue')],
           [T + "test_stats.py::test_mcnemar_exact_by_hand"]),
    Mutant("welch-pooled", "two settings' seeds compared with a pooled-variance t-test",
           [("stats.py", "stats.ttest_ind(a, b, equal_var=False)", "stats.ttest_ind(a, b, equal_var=True)")],
           [T + "test_stats.py::test_welch_t_by_hand"]),
    Mutant("paired-on-other-images", "compare.py pairs runs tested on other images of the same count",
           [("compare.py", 'if not np.array_equal(a["indices"], b["indices"]):', "if False:")],
           [T + "test_stats.py::test_compare_tells_which_differences_are_real"]),
    Mutant("predictions-unchecked", "a predictions file with lies in it is believed",
           [("report.py", "    problem = predictions_problem(probs, predicted, labels, indices, meta)\n",
             "    problem = None\n")],
           [T + "test_stats.py::test_predictions_that_lie_are_refused"]),
    Mutant("release-bn-in-float16", "a float16 release file rounds BatchNorm statistics too (logits off by ~2)",
           [("checkpoints.py", "v.is_floating_point() and v.dim() >= 2 else v.detach()",
             "v.is_floating_point() else v.detach()")],
           [T + "test_export.py::test_check_float16_and_a_check_that_fails"]),
    Mutant("export-check-never-fails", "export.py --check passes a file that computes other logits",
           [("export.py", "        if diff > deploy.TOLERANCE:\n", "        if diff > 1e9:\n")],
           [T + "test_export.py::test_check_float16_and_a_check_that_fails"]),
    Mutant("release-loses-weights", "a release file whose weights do not load back exactly",
           [("checkpoints.py", "    weights = {k: v.detach().to(dtype)", "    weights = {k: v.detach().to(torch.bfloat16)")],
           [T + "test_export.py::test_every_model_exports_to_every_format"]),
    Mutant("ece-signed", "the calibration error lets over- and under-confidence cancel",
           [("stats.py", "np.abs(acc[filled] - conf[filled])", "(acc[filled] - conf[filled])")],
           [T + "test_stats.py::test_expected_calibration_error_by_hand"]),
    # -- issue 39: image folders ------------------------------------------------------------------
    Mutant("folder-hidden-files-read", "a folder's .DS_Store or .ipynb_checkpoints images are trained on",
           [("folders.py", "found += [name if rel == \".\" else f\"{rel}/{name}\".replace(os.sep, \"/\")\n"
                           "                  for name in files if visible(name) and",
             "found += [name if rel == \".\" else f\"{rel}/{name}\".replace(os.sep, \"/\")\n"
             "                  for name in files if True and")],
           [T + "test_folders.py::test_layout_classes_files_and_order"]),
    Mutant("folder-class-major-order", "a folder's images in ImageFolder's class-major order: CIFAR-10 as a "
           "folder no longer gives the binary files' splits",
           [("folders.py", "entries.sort(key=lambda e: (e[0], e[1]))", "entries.sort(key=lambda e: (e[1], e[0]))")],
           [T + "test_folders.py::test_cifar_as_a_folder_equals_the_binary_files_bit_for_bit"]),
    Mutant("folder-16-bit-clipped", "16-bit grayscale images become white (PIL's own conversion)",
           [("folders.py", "values = values.clip(0, 65535) // 257", "values = values.clip(0, 255)")],
           [T + "test_folders.py::test_modes_decode_to_rgb_and_16_bit_is_scaled_not_clipped"]),
    Mutant("folder-resume-other-chunk-size", "an interrupted cache resumes with chunks of another size: "
           "images left black",
           [("folders.py", 'and state["chunk"] == CHUNK', "")],
           [T + "test_folders.py::test_ctrl_c_while_caching_stops_in_one_line_and_another_chunk_size_starts_over"]),
    Mutant("folder-bad-file-kept", "an unreadable image is cached as a black picture of its class",
           [("folders.py", "usable[[i for i, _ in bad]] = False", "usable[[]] = False")],
           [T + "test_folders.py::test_each_bad_file_is_skipped_counted_named_and_listed"]),
    Mutant("folder-stale-cache", "a changed folder trains on its old cache",
           [("folders.py", "digest = hashlib.sha256(json.dumps([layout.classes, records]).encode()).hexdigest()",
             "digest = hashlib.sha256(json.dumps([layout.classes]).encode()).hexdigest()")],
           [T + "test_folders.py::test_cache_is_reused_and_a_changed_folder_rebuilds_saying_why"]),
    Mutant("kernel-flip-box-not-mirrored", "a flipped image of a folder's cache is cropped at the unflipped box",
           [("data.py", "            left = size - left - side\n", "            pass\n")],
           [T + "test_data.py::test_kernel_path_matches_pil"]),
    Mutant("classes-always-cifar", "a checkpoint records CIFAR-10's names whatever it was trained on",
           [("checkpoints.py", '"classes": self.classes,', '"classes": list(data.CLASSES)[:len(self.classes)],')],
           [T + "test_folders.py::test_three_classes_train_evaluate_explain_export[sample_resnet]"]),
]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", action="store_true", help="print the mutants and their tests, run nothing")
    p.add_argument("--only", nargs="+", metavar="NAME", help="these mutants only")
    p.add_argument("--no-baseline", action="store_true", help="skip the check that the tests pass unmutated")
    args = p.parse_args(argv)
    names = {m.name for m in MUTANTS}
    unknown = [n for n in args.only or [] if n not in names]
    if unknown:
        p.error(f"unknown mutant {', '.join(unknown)}; --list shows them")
    return args


def apply(tree, mutant):
    """Edit the copy; -> {file: original text} to restore it."""
    originals = {}
    for file, old, new in mutant.edits:
        path = os.path.join(tree, file)
        text = originals.get(file) or open(path).read()
        originals.setdefault(file, text)
        current = open(path).read()
        if current.count(old) != 1:
            raise SystemExit(f"mutants.py: error: {mutant.name}: the text to edit occurs {current.count(old)} times "
                             f"in {file} (expected once): the list is out of date with the code")
        with open(path, "w") as f:
            f.write(current.replace(old, new))
    return originals


def restore(tree, originals):
    for file, text in originals.items():
        with open(os.path.join(tree, file), "w") as f:
            f.write(text)


def pytest(tree, tests):
    """-> (exit code, seconds, last line of pytest's output)."""
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests], cwd=tree,
                          capture_output=True, text=True, env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    return proc.returncode, time.time() - start, lines[-1] if lines else proc.stderr.strip()[-200:]


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    if args.list:
        for m in chosen:
            print(f"{m.name}: {m.why}\n    " + "\n    ".join(m.tests))
        return 0
    with tempfile.TemporaryDirectory(prefix="mutants-") as tmp:
        tree = os.path.join(tmp, "tree")
        shutil.copytree(ROOT, tree, ignore=COPY_IGNORE)
        if not args.no_baseline:
            tests = sorted({t for m in chosen for t in m.tests})
            code, seconds, last = pytest(tree, tests)
            print(f"baseline: {len(tests)} tests on the unmutated tree: {last} ({seconds:.0f} s)", flush=True)
            if code != 0:
                print("mutants.py: error: the tests fail without a mutant; fix that first", file=sys.stderr)
                return 2
        rows, missed = [], []
        for m in chosen:
            originals = apply(tree, m)
            try:
                code, seconds, last = pytest(tree, m.tests)
            finally:
                restore(tree, originals)
            caught = code == 1  # 1: tests failed; 2-5: pytest could not run them (a broken mutant)
            verdict = "caught" if caught else ("NOT CAUGHT" if code == 0 else f"error (pytest exit {code}: {last})")
            rows.append(f"| {m.name} | {m.why} | {', '.join(t.split('::')[-1] for t in m.tests)} | {verdict} | "
                        f"{seconds:.0f} |")
            print(f"{m.name}: {verdict} ({seconds:.0f} s)", flush=True)
            if not caught:
                missed.append(m.name)
    print("\n| mutant | the bug | tests run | result | seconds |\n|---|---|---|---|---:|\n" + "\n".join(rows))
    print(f"\n{len(chosen) - len(missed)} of {len(chosen)} mutants caught"
          + (f"; not caught: {', '.join(missed)}" if missed else ""))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
