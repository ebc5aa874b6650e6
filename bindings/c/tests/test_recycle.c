/*
 * The C ABI from C: a tiny training run driven step by step, the fused loss against a
 * reference computed here in double precision, and bad input (NULL pointers, wrong sizes,
 * malformed recipes) each answered by an error status and a message.
 *
 * Usage: test_recycle OUT_DIR   (the training run reads Fashion-MNIST from where the library
 * finds it: RECYCLE_FASHION_MNIST_DIR, the Debian package or the download cache)
 * Built and run by bindings/c/tests/c_program.rs (cargo test -p recycle-c).
 */
#define _POSIX_C_SOURCE 200809L /* mkdir */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "recycle.h"

static int failures = 0;
static int checks = 0;

#define CHECK(cond, ...)                                                       \
    do {                                                                       \
        checks++;                                                              \
        if (!(cond)) {                                                         \
            failures++;                                                        \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);               \
            fprintf(stderr, __VA_ARGS__);                                      \
            fprintf(stderr, "\n");                                             \
        }                                                                      \
    } while (0)

static void expect_status(int32_t status, int32_t want, const char *what) {
    const char *msg = recycle_last_error();
    CHECK(status == want, "%s: status %d, expected %d (last error: %s)", what,
          (int)status, (int)want, msg);
    if (want != RECYCLE_OK) {
        CHECK(msg != NULL && strlen(msg) > 0, "%s: empty error message", what);
        printf("  %-48s -> %d: %s\n", what, (int)status, msg);
    }
}

static int close_to(double got, double want, double tol) {
    return fabs(got - want) <= tol * (1.0 + fabs(want));
}

/* ------------------------------------------------------------------------------------------ */
/* The reference loss: CE, KL(p_t || p_s) * T^2 or MSE, averaged over the rows that count.    */
/* ------------------------------------------------------------------------------------------ */

static void softmax(const double *x, int n, double *p) {
    double m = x[0], z = 0.0;
    for (int i = 1; i < n; i++) m = x[i] > m ? x[i] : m;
    for (int i = 0; i < n; i++) z += exp(x[i] - m);
    for (int i = 0; i < n; i++) p[i] = exp(x[i] - m) / z;
}

static void reference_loss(const float *s, const float *teachers, int k, const int32_t *y,
                           const uint8_t *mask, int rows, int classes, int32_t kind, double T,
                           double w, int32_t ignore, double *ce, double *kd, double *grad) {
    int n_ce = 0, n_kd = 0;
    for (int r = 0; r < rows; r++) {
        int counts = mask == NULL || mask[r];
        n_ce += counts && y[r] != ignore;
        n_kd += counts && k > 0 && w != 0.0;
    }
    double *x = malloc(sizeof(double) * classes), *t = malloc(sizeof(double) * classes);
    double *p = malloc(sizeof(double) * classes), *q = malloc(sizeof(double) * classes);
    *ce = 0.0;
    *kd = 0.0;
    for (int i = 0; i < rows * classes; i++) grad[i] = 0.0;
    for (int r = 0; r < rows; r++) {
        if (mask != NULL && !mask[r]) continue;
        const float *sr = s + r * classes;
        double *g = grad + r * classes;
        if (y[r] != ignore) {
            for (int c = 0; c < classes; c++) x[c] = sr[c];
            softmax(x, classes, p);
            *ce += -log(p[y[r]]);
            for (int c = 0; c < classes; c++) g[c] += (p[c] - (c == y[r])) / n_ce;
        }
        if (n_kd == 0) continue;
        for (int c = 0; c < classes; c++) {
            t[c] = 0.0;
            for (int j = 0; j < k; j++) t[c] += teachers[(j * rows + r) * classes + c];
            t[c] /= k;
        }
        if (kind == RECYCLE_KD_KL) {
            for (int c = 0; c < classes; c++) x[c] = sr[c] / T;
            softmax(x, classes, p); /* student at T */
            for (int c = 0; c < classes; c++) x[c] = t[c] / T;
            softmax(x, classes, q); /* teacher at T */
            double kl = 0.0;
            for (int c = 0; c < classes; c++) kl += q[c] * (log(q[c]) - log(p[c]));
            *kd += kl * T * T;
            for (int c = 0; c < classes; c++) g[c] += w * T * (p[c] - q[c]) / n_kd;
        } else {
            for (int c = 0; c < classes; c++) {
                double d = sr[c] - t[c];
                *kd += d * d / classes;
                g[c] += w * 2.0 * d / ((double)n_kd * classes);
            }
        }
    }
    if (n_ce > 0) *ce /= n_ce;
    if (n_kd > 0) *kd /= n_kd;
    free(x);
    free(t);
    free(p);
    free(q);
}

#define ROWS 6
#define CLASSES 9
#define K 2
#define N (ROWS * CLASSES)

static float student[N], teachers[K * N], grad[N];
static int32_t labels[ROWS] = {3, 0, -100, 8, 5, 1};
static int64_t labels64[ROWS] = {3, 0, -100, 8, 5, 1};
static uint8_t mask[ROWS] = {1, 1, 1, 0, 1, 1};

static void check_loss(const char *what, int32_t kind, float T, float w, int k,
                       const uint8_t *m, int wide) {
    RecycleLossConfig cfg = {kind, T, w, -100};
    RecycleLoss out;
    int32_t st = recycle_kd_loss(&cfg, student, N, CLASSES, k ? teachers : NULL, (size_t)k * N,
                                 (size_t)k, wide ? (const void *)labels64 : (const void *)labels,
                                 ROWS, wide ? RECYCLE_LABELS_I64 : RECYCLE_LABELS_I32, m,
                                 m ? ROWS : 0, grad, N, &out);
    expect_status(st, RECYCLE_OK, what);
    double ce, kd, g[N];
    reference_loss(student, teachers, k, labels, m, ROWS, CLASSES, kind, T, w, -100, &ce, &kd, g);
    CHECK(close_to(out.ce, ce, 1e-5), "%s: ce %.7f, reference %.7f", what, out.ce, ce);
    CHECK(close_to(out.kd, kd, 1e-5), "%s: kd %.7f, reference %.7f", what, out.kd, kd);
    CHECK(close_to(out.total, ce + w * kd, 1e-5), "%s: total %.7f, reference %.7f", what,
          out.total, ce + w * kd);
    double worst = 0.0;
    for (int i = 0; i < N; i++) {
        double e = fabs(grad[i] - g[i]);
        worst = e > worst ? e : worst;
    }
    CHECK(worst < 1e-6, "%s: gradient differs from the reference by %.3g", what, worst);
    printf("  %-48s ce %.6f kd %.6f total %.6f (rows %zu/%zu), max |grad - ref| %.2g\n", what,
           out.ce, out.kd, out.total, out.ce_rows, out.kd_rows, worst);
}

static void test_loss(void) {
    printf("fused loss against the C reference\n");
    unsigned state = 12345u;
    for (int i = 0; i < N; i++) {
        state = state * 1103515245u + 12345u;
        student[i] = ((float)(state >> 8) / 16777216.0f - 0.5f) * 6.0f;
    }
    for (int i = 0; i < K * N; i++) {
        state = state * 1103515245u + 12345u;
        teachers[i] = ((float)(state >> 8) / 16777216.0f - 0.5f) * 6.0f;
    }
    check_loss("KL, T=4, weight 0.5, 2 teachers", RECYCLE_KD_KL, 4.0f, 0.5f, K, NULL, 0);
    check_loss("KL, T=2, 1 teacher, mask, int64 labels", RECYCLE_KD_KL, 2.0f, 1.0f, 1, mask, 1);
    check_loss("MSE, weight 0.3, 2 teachers, mask", RECYCLE_KD_MSE, 1.0f, 0.3f, K, mask, 0);
    check_loss("CE only (no teachers)", RECYCLE_KD_KL, 1.0f, 0.0f, 0, NULL, 0);
}

static void test_loss_errors(void) {
    printf("fused loss: bad input\n");
    RecycleLossConfig cfg = {RECYCLE_KD_KL, 2.0f, 0.5f, -100};
    RecycleLoss out;
    expect_status(recycle_kd_loss(&cfg, NULL, N, CLASSES, teachers, K * N, K, labels, ROWS,
                                  RECYCLE_LABELS_I32, NULL, 0, grad, N, &out),
                  RECYCLE_ERROR_NULL_POINTER, "NULL student");
    expect_status(recycle_kd_loss(NULL, student, N, CLASSES, teachers, K * N, K, labels, ROWS,
                                  RECYCLE_LABELS_I32, NULL, 0, grad, N, &out),
                  RECYCLE_ERROR_NULL_POINTER, "NULL config");
    expect_status(recycle_kd_loss(&cfg, student, N, CLASSES, teachers, K * N, K, labels, ROWS,
                                  RECYCLE_LABELS_I32, NULL, 0, grad, N, NULL),
                  RECYCLE_ERROR_NULL_POINTER, "NULL out");
    expect_status(recycle_kd_loss(&cfg, student, N, CLASSES, NULL, K * N, K, labels, ROWS,
                                  RECYCLE_LABELS_I32, NULL, 0, grad, N, &out),
                  RECYCLE_ERROR_NULL_POINTER, "NULL teachers with num_teachers 2");
    expect_status(recycle_kd_loss(&cfg, student, N - 1, CLASSES, teachers, K * (N - 1), K,
                                  labels, ROWS, RECYCLE_LABELS_I32, NULL, 0, NULL, 0, &out),
                  RECYCLE_ERROR_INVALID_ARGUMENT, "student_len != rows * classes");
    expect_status(recycle_kd_loss(&cfg, student, N, CLASSES, teachers, K * N - 3, K, labels,
                                  ROWS, RECYCLE_LABELS_I32, NULL, 0, grad, N, &out),
                  RECYCLE_ERROR_INVALID_ARGUMENT, "teachers_len != num_teachers * student_len");
    expect_status(recycle_kd_loss(&cfg, student, N, CLASSES, teachers, K * N, K, labels, ROWS,
                                  RECYCLE_LABELS_I32, NULL, 0, grad, N - 1, &out),
                  RECYCLE_ERROR_INVALID_ARGUMENT, "grad_len != student_len");
    expect_status(recycle_kd_loss(&cfg, student, N, CLASSES, teachers, K * N, K, labels, ROWS,
                                  RECYCLE_LABELS_I32, mask, ROWS - 1, grad, N, &out),
                  RECYCLE_ERROR_INVALID_ARGUMENT, "mask_len != rows");
    int32_t bad_labels[ROWS] = {3, 0, 9, 8, 5, 1};
    expect_status(recycle_kd_loss(&cfg, student, N, CLASSES, teachers, K * N, K, bad_labels,
                                  ROWS, RECYCLE_LABELS_I32, NULL, 0, grad, N, &out),
                  RECYCLE_ERROR_INVALID_ARGUMENT, "label 9 with 9 classes");
    expect_status(recycle_kd_loss(&cfg, student, N, CLASSES, teachers, K * N, K, labels, ROWS,
                                  7, NULL, 0, grad, N, &out),
                  RECYCLE_ERROR_INVALID_ARGUMENT, "unknown label_type");
    RecycleLossConfig bad_kind = {42, 2.0f, 0.5f, -100};
    expect_status(recycle_kd_loss(&bad_kind, student, N, CLASSES, teachers, K * N, K, labels,
                                  ROWS, RECYCLE_LABELS_I32, NULL, 0, grad, N, &out),
                  RECYCLE_ERROR_INVALID_ARGUMENT, "unknown kind");
    RecycleLossConfig bad_t = {RECYCLE_KD_KL, 0.0f, 0.5f, -100};
    expect_status(recycle_kd_loss(&bad_t, student, N, CLASSES, teachers, K * N, K, labels, ROWS,
                                  RECYCLE_LABELS_I32, NULL, 0, grad, N, &out),
                  RECYCLE_ERROR_INVALID_ARGUMENT, "temperature 0");
}

/* ------------------------------------------------------------------------------------------ */
/* Training                                                                                   */
/* ------------------------------------------------------------------------------------------ */

static char *recipe_named(const char *name, const char *out_dir, const char *lr) {
    const char *fmt =
        "name = \"%s\"\n"
        "out_dir = \"%s\"\n"
        "[model]\nkind = \"resnet\"\nwidth = 0.0625\n"
        "[data]\ndataset = \"fashion-mnist\"\ntrain_limit = 288\neval_limit = 128\n"
        "[train]\nbatch_size = 32\nepochs = 1.0\nevals = 2\n"
        "[optimizer]\nkind = \"sgdw\"\nlr = %s\nweight_decay = 5e-4\nwarmup = 0.1\n";
    size_t n = strlen(fmt) + strlen(name) + strlen(out_dir) + strlen(lr) + 1;
    char *s = malloc(n);
    snprintf(s, n, fmt, name, out_dir, lr);
    return s;
}

static char *recipe_text(const char *out_dir, const char *lr) {
    return recipe_named("c-abi", out_dir, lr);
}

static int file_exists(const char *path) {
    FILE *f = fopen(path, "rb");
    if (f) fclose(f);
    return f != NULL;
}

static void test_training(const char *out_dir) {
    printf("training through the C ABI\n");
    RecycleTrainer *t = NULL;
    char *recipe = recipe_text(out_dir, "0.1");

    expect_status(recycle_trainer_new(NULL, 0, &t), RECYCLE_ERROR_NULL_POINTER, "NULL recipe");
    expect_status(recycle_trainer_new(recipe, 0, NULL), RECYCLE_ERROR_NULL_POINTER, "NULL out");
    expect_status(recycle_trainer_new("name = \"x\"\n[model", 0, &t), RECYCLE_ERROR_RECIPE,
                  "malformed TOML");
    CHECK(t == NULL, "a failed recycle_trainer_new leaves *out NULL");
    char *negative = recipe_text(out_dir, "-1.0");
    expect_status(recycle_trainer_new(negative, 0, &t), RECYCLE_ERROR_RECIPE, "negative lr");
    free(negative);
    expect_status(recycle_trainer_new(recipe, 0x10, &t), RECYCLE_ERROR_INVALID_ARGUMENT,
                  "unknown flag bits");

    expect_status(recycle_trainer_new(recipe, RECYCLE_OVERWRITE, &t), RECYCLE_OK, "new");
    CHECK(t != NULL, "recycle_trainer_new wrote no trainer");
    if (t == NULL) return;

    RecycleMetrics m;
    expect_status(recycle_trainer_metrics(t, &m), RECYCLE_OK, "metrics before a step");
    CHECK(m.step == 0 && m.total_steps == 8, "step %llu of %llu, expected 0 of 8",
          (unsigned long long)m.step, (unsigned long long)m.total_steps);
    CHECK(isnan(m.ce) && isnan(m.last_eval), "no loss or evaluation before the first step");
    CHECK(m.skipped_steps == 0, "skipped %llu steps before the first",
          (unsigned long long)m.skipped_steps);

    uint64_t ran = 0;
    expect_status(recycle_trainer_run_steps(t, 3, &ran), RECYCLE_OK, "run 3 steps");
    expect_status(recycle_trainer_metrics(t, &m), RECYCLE_OK, "metrics");
    CHECK(ran == 3 && m.step == 3 && m.samples == 96, "ran %llu, step %llu, samples %llu",
          (unsigned long long)ran, (unsigned long long)m.step, (unsigned long long)m.samples);
    CHECK(isfinite(m.ce) && m.ce > 0.0f && m.loss == m.ce && isnan(m.kd),
          "ce %f loss %f kd %f", m.ce, m.loss, m.kd);
    CHECK(isfinite(m.lr) && m.lr > 0.0f && m.train_seconds > 0.0 &&
              m.wall_seconds >= m.train_seconds && !m.done,
          "lr %f train %f wall %f done %d", m.lr, m.train_seconds, m.wall_seconds, m.done);
    printf("  after 3 steps: ce %.4f, lr %.4f, %.2f s training\n", m.ce, m.lr, m.train_seconds);

    size_t n = strlen(out_dir) + 32;
    char *ckpt = malloc(n);
    snprintf(ckpt, n, "%s/manual.safetensors", out_dir);
    expect_status(recycle_trainer_save_checkpoint(t, ckpt), RECYCLE_OK, "save checkpoint");
    CHECK(file_exists(ckpt), "%s was not written", ckpt);
    expect_status(recycle_trainer_save_checkpoint(t, NULL), RECYCLE_ERROR_NULL_POINTER,
                  "save_checkpoint(NULL path)");
    expect_status(recycle_trainer_metrics(t, NULL), RECYCLE_ERROR_NULL_POINTER,
                  "metrics(NULL out)");
    expect_status(recycle_trainer_run_steps(NULL, 1, NULL), RECYCLE_ERROR_NULL_POINTER,
                  "run_steps(NULL trainer)");
    float final_eval = -1.0f;
    expect_status(recycle_trainer_finish(t, &final_eval), RECYCLE_ERROR_INVALID_ARGUMENT,
                  "finish before the last step");

    expect_status(recycle_trainer_run_steps(t, 100, &ran), RECYCLE_OK, "run the rest");
    expect_status(recycle_trainer_metrics(t, &m), RECYCLE_OK, "metrics at the end");
    CHECK(ran == 5 && m.step == 8 && m.done, "ran %llu, step %llu, done %d",
          (unsigned long long)ran, (unsigned long long)m.step, m.done);
    CHECK(m.last_eval >= 0.0f && m.last_eval <= 1.0f, "last_eval %f", m.last_eval);
    CHECK(m.skipped_steps == 0, "a finite run skipped %llu steps",
          (unsigned long long)m.skipped_steps);
    expect_status(recycle_trainer_finish(t, &final_eval), RECYCLE_OK, "finish");
    CHECK(final_eval == m.last_eval, "final eval %f, last eval %f", final_eval, m.last_eval);
    printf("  finished: accuracy %.4f after %llu steps\n", final_eval,
           (unsigned long long)m.step);
    expect_status(recycle_trainer_run_steps(t, 1, &ran), RECYCLE_ERROR_INVALID_ARGUMENT,
                  "run_steps after finish");
    expect_status(recycle_trainer_free(t), RECYCLE_OK, "free");
    expect_status(recycle_trainer_free(NULL), RECYCLE_OK, "free(NULL)");

    char *summary = malloc(n + 16);
    snprintf(summary, n + 16, "%s/c-abi/summary.json", out_dir);
    CHECK(file_exists(summary), "%s was not written", summary);

    /* The run directory now holds a run: starting again needs a flag; resuming finds it done. */
    t = NULL;
    expect_status(recycle_trainer_new(recipe, 0, &t), RECYCLE_ERROR_ENGINE,
                  "new over an existing run");
    expect_status(recycle_trainer_new(recipe, RECYCLE_RESUME, &t), RECYCLE_OK, "resume");
    expect_status(recycle_trainer_metrics(t, &m), RECYCLE_OK, "metrics after resume");
    CHECK(m.step == 8 && m.done, "resumed at step %llu", (unsigned long long)m.step);
    expect_status(recycle_trainer_free(t), RECYCLE_OK, "free the resumed trainer");

    free(summary);
    free(ckpt);
    free(recipe);
}

/* A finish that cannot write final.safetensors (here a non-empty directory stands where the
 * file goes, which no user, root included, can replace with a file): the finish fails with
 * an engine status, and every later call on the handle answers with a status and a message,
 * never the internal-error path. */
static void test_failed_finish(const char *out_dir) {
    printf("a finish that fails\n");
    RecycleTrainer *t = NULL;
    char *recipe = recipe_named("c-abi-blocked", out_dir, "0.1");
    expect_status(recycle_trainer_new(recipe, RECYCLE_OVERWRITE, &t), RECYCLE_OK, "new");
    free(recipe);
    if (t == NULL) return;
    uint64_t ran = 0;
    expect_status(recycle_trainer_run_steps(t, 100, &ran), RECYCLE_OK, "run every step");

    size_t n = strlen(out_dir) + 64;
    char *blocker = malloc(n), *inner = malloc(n);
    snprintf(blocker, n, "%s/c-abi-blocked/final.safetensors", out_dir);
    snprintf(inner, n, "%s/c-abi-blocked/final.safetensors/keep", out_dir);
    CHECK(mkdir(blocker, 0755) == 0 && mkdir(inner, 0755) == 0, "cannot create %s", inner);

    float final_eval = -1.0f;
    expect_status(recycle_trainer_finish(t, &final_eval), RECYCLE_ERROR_ENGINE,
                  "finish onto an unwritable final.safetensors");
    CHECK(strstr(recycle_last_error(), "final.safetensors") != NULL,
          "the finish error names the file: %s", recycle_last_error());
    CHECK(final_eval == -1.0f, "a failed finish wrote final_eval %f", final_eval);

    RecycleMetrics m;
    expect_status(recycle_trainer_metrics(t, &m), RECYCLE_OK, "metrics after a failed finish");
    CHECK(m.step == 8 && m.done, "step %llu, done %d", (unsigned long long)m.step, m.done);
    size_t cn = strlen(out_dir) + 32;
    char *ckpt = malloc(cn);
    snprintf(ckpt, cn, "%s/after-failure.safetensors", out_dir);
    expect_status(recycle_trainer_save_checkpoint(t, ckpt), RECYCLE_ERROR_INVALID_ARGUMENT,
                  "save after a failed finish");
    CHECK(strstr(recycle_last_error(), "finish failed") != NULL &&
              strstr(recycle_last_error(), "RECYCLE_RESUME") != NULL,
          "the message gives the reason and what to do: %s", recycle_last_error());
    CHECK(!file_exists(ckpt), "%s was written after a failed finish", ckpt);
    expect_status(recycle_trainer_run_steps(t, 1, &ran), RECYCLE_ERROR_INVALID_ARGUMENT,
                  "run_steps after a failed finish");
    expect_status(recycle_trainer_finish(t, &final_eval), RECYCLE_ERROR_INVALID_ARGUMENT,
                  "finish again after a failed finish");
    expect_status(recycle_trainer_free(t), RECYCLE_OK, "free after a failed finish");
    free(ckpt);
    free(inner);
    free(blocker);
}

/* A run whose learning rate makes the weights overflow, with on_nonfinite = "skip": the steps
 * that meet a NaN or infinity are skipped and counted in the metrics (the first step, on finite
 * initial weights, is not); under the default "stop" the same run fails at a step. */
static char *diverging_recipe(const char *name, const char *out_dir, const char *on_nonfinite) {
    const char *fmt =
        "name = \"%s\"\n"
        "out_dir = \"%s\"\n"
        "[model]\nkind = \"resnet\"\nwidth = 0.0625\n"
        "[data]\ndataset = \"fashion-mnist\"\ntrain_limit = 96\neval_limit = 32\n"
        "[train]\nbatch_size = 16\nsamples = 96\nevals = 1\non_nonfinite = \"%s\"\n"
        "[optimizer]\nkind = \"sgdw\"\nlr = 1e30\nschedule = \"constant\"\n";
    size_t n = strlen(fmt) + strlen(name) + strlen(out_dir) + strlen(on_nonfinite) + 1;
    char *s = malloc(n);
    snprintf(s, n, fmt, name, out_dir, on_nonfinite);
    return s;
}

static void test_skipped_steps(const char *out_dir) {
    printf("skipped steps in the metrics\n");
    RecycleTrainer *t = NULL;
    char *recipe = diverging_recipe("c-abi-skip", out_dir, "skip");
    expect_status(recycle_trainer_new(recipe, RECYCLE_OVERWRITE, &t), RECYCLE_OK, "new (skip)");
    free(recipe);
    if (t == NULL) return;
    uint64_t ran = 0;
    RecycleMetrics m;
    expect_status(recycle_trainer_run_steps(t, 1, &ran), RECYCLE_OK, "the first step");
    expect_status(recycle_trainer_metrics(t, &m), RECYCLE_OK, "metrics after the first step");
    CHECK(m.step == 1 && m.skipped_steps == 0, "step %llu, skipped %llu",
          (unsigned long long)m.step, (unsigned long long)m.skipped_steps);
    expect_status(recycle_trainer_run_steps(t, 100, &ran), RECYCLE_OK, "run the rest (skip)");
    expect_status(recycle_trainer_metrics(t, &m), RECYCLE_OK, "metrics at the end (skip)");
    CHECK(m.done && m.step == 6 && m.skipped_steps > 0 && m.skipped_steps < m.step,
          "done %d, step %llu, skipped %llu", m.done, (unsigned long long)m.step,
          (unsigned long long)m.skipped_steps);
    printf("  %llu of %llu steps skipped\n", (unsigned long long)m.skipped_steps,
           (unsigned long long)m.step);
    float final_eval = -1.0f;
    expect_status(recycle_trainer_finish(t, &final_eval), RECYCLE_OK, "finish (skip)");
    expect_status(recycle_trainer_metrics(t, &m), RECYCLE_OK, "metrics after finish (skip)");
    CHECK(m.skipped_steps > 0, "the count is kept after finish: %llu",
          (unsigned long long)m.skipped_steps);
    expect_status(recycle_trainer_free(t), RECYCLE_OK, "free (skip)");

    t = NULL;
    recipe = diverging_recipe("c-abi-stop", out_dir, "stop");
    expect_status(recycle_trainer_new(recipe, RECYCLE_OVERWRITE, &t), RECYCLE_OK, "new (stop)");
    free(recipe);
    if (t == NULL) return;
    expect_status(recycle_trainer_run_steps(t, 100, &ran), RECYCLE_ERROR_ENGINE,
                  "a non-finite step under stop");
    CHECK(strstr(recycle_last_error(), "step") != NULL, "the error names the step: %s",
          recycle_last_error());
    expect_status(recycle_trainer_free(t), RECYCLE_OK, "free (stop)");
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s OUT_DIR\n", argv[0]);
        return 2;
    }
    test_loss();
    test_loss_errors();
    test_training(argv[1]);
    test_failed_finish(argv[1]);
    test_skipped_steps(argv[1]);
    printf("%d checks, %d failed\n", checks, failures);
    return failures == 0 ? 0 : 1;
}
