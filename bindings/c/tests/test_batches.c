/*
 * Caller-fed batches through the C ABI: steps, evaluations and teacher logits on buffers this
 * program owns; each kind of bad input (NULL, wrong sizes, unknown index types, out-of-range
 * labels, calls after finish) answered by a status and a message; and two trainers training
 * in two threads at once (one of them created in another thread) giving the same losses as
 * one trainer alone.
 *
 * Usage: test_batches OUT_DIR   (data found as for test_recycle; a teacher run is trained
 * here first). Built and run by bindings/c/tests/c_program.rs.
 */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "recycle.h"

static int failures = 0, checks = 0;
#define CHECK(cond, ...)                                                         \
    do {                                                                         \
        checks++;                                                                \
        if (!(cond)) {                                                           \
            failures++;                                                          \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);                 \
            fprintf(stderr, __VA_ARGS__);                                        \
            fprintf(stderr, "\n");                                               \
        }                                                                        \
    } while (0)

static void expect(int32_t status, int32_t want, const char *msg_part, const char *what) {
    const char *msg = recycle_last_error();
    CHECK(status == want, "%s: status %d, expected %d (%s)", what, (int)status, (int)want, msg);
    if (want != RECYCLE_OK) {
        CHECK(strstr(msg, msg_part) != NULL, "%s: message `%s` lacks `%s`", what, msg, msg_part);
        printf("  %-44s -> %d: %s\n", what, (int)status, msg);
    }
}

#define N 8
#define PIXELS (28 * 28)
#define STEPS 6

static const char *out_dir;

static char *recipe(const char *name, const char *extra) {
    char *r = malloc(4096);
    snprintf(r, 4096,
             "name = \"%s\"\nout_dir = \"%s\"\nseed = 5\n%s\n"
             "[model]\nkind = \"resnet\"\nwidth = 0.0625\n"
             "[data]\ndataset = \"fashion-mnist\"\ntrain_limit = 192\neval_limit = 64\n"
             "[train]\nbatch_size = %d\nsamples = %d\nevals = 1\n"
             "[optimizer]\nkind = \"sgdw\"\nlr = 0.1\n",
             name, out_dir, extra, N, N * STEPS);
    return r;
}

static void make_batch(uint64_t step, float *x, int32_t *y) {
    for (uint64_t i = 0; i < N; i++) {
        y[i] = (int32_t)((3 * step + i) % 10);
        for (uint64_t j = 0; j < PIXELS; j++)
            x[i * PIXELS + j] = (float)((j * 31 + i * 13 + step * 7 + (uint64_t)y[i] * 97) % 251) / 250.0f;
    }
}

static RecycleTrainer *new_trainer(const char *name, const char *extra) {
    char *r = recipe(name, extra);
    RecycleTrainer *t = NULL;
    expect(recycle_trainer_new(r, RECYCLE_OVERWRITE, &t), RECYCLE_OK, "", name);
    free(r);
    return t;
}

/* Trains STEPS steps on the made batches; writes the loss of each. Returns 0 on success. */
static int train(RecycleTrainer *t, float *losses) {
    float *x = malloc(sizeof(float) * N * PIXELS);
    int32_t y[N];
    int rc = 0;
    for (uint64_t s = 0; s < STEPS && rc == 0; s++) {
        RecycleStep out = {0};
        make_batch(s, x, y);
        rc = recycle_trainer_step_images(t, x, N * PIXELS, y, N, RECYCLE_LABELS_I32, N, 1, 28,
                                         28, &out);
        losses[s] = out.loss;
        if (rc == 0 && out.step != s) rc = -1;
    }
    free(x);
    return rc;
}

struct job {
    RecycleTrainer *t; /* NULL: the thread creates its own */
    const char *name;
    float losses[STEPS];
    int rc;
};

static void *run_job(void *arg) {
    struct job *j = arg;
    if (j->t == NULL) j->t = new_trainer(j->name, "");
    j->rc = j->t == NULL ? -2 : train(j->t, j->losses);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 2) return fprintf(stderr, "usage: test_batches OUT_DIR\n"), 2;
    out_dir = argv[1];
    float x[N * PIXELS];
    int32_t y[N];
    int64_t y64[N];
    make_batch(0, x, y);
    for (int i = 0; i < N; i++) y64[i] = y[i];

    /* One trainer alone: the reference losses. Then the teacher of the distilled run. */
    RecycleTrainer *alone = new_trainer("alone", "");
    float want[STEPS];
    CHECK(train(alone, want) == 0, "training alone: %s", recycle_last_error());
    RecycleEval ev = {0};
    expect(recycle_trainer_evaluate_images(alone, x, N * PIXELS, y64, N, RECYCLE_LABELS_I64, N,
                                           1, 28, 28, &ev), RECYCLE_OK, "", "evaluate (int64)");
    CHECK(ev.rows == N && ev.accuracy == (float)ev.correct / N && isfinite(ev.loss),
          "evaluation: rows %llu, accuracy %f, loss %f", (unsigned long long)ev.rows,
          ev.accuracy, ev.loss);
    RecycleStep st = {0};
    expect(recycle_trainer_step_images(alone, x, N * PIXELS, y, N, RECYCLE_LABELS_I32, N, 1, 28,
                                       28, &st), RECYCLE_ERROR_ENGINE, "has done all its 6 steps",
           "step past the run's end");
    float acc = -1.0f;
    expect(recycle_trainer_finish(alone, &acc), RECYCLE_OK, "", "finish");
    CHECK(acc >= 0.0f && acc <= 1.0f, "final accuracy %f", acc);
    expect(recycle_trainer_step_images(alone, x, N * PIXELS, y, N, RECYCLE_LABELS_I32, N, 1, 28,
                                       28, &st), RECYCLE_ERROR_INVALID_ARGUMENT, "finished",
           "step after finish");
    expect(recycle_trainer_evaluate_images(alone, x, N * PIXELS, y, N, RECYCLE_LABELS_I32, N, 1,
                                           28, 28, &ev), RECYCLE_ERROR_INVALID_ARGUMENT,
           "finished", "evaluate after finish");
    recycle_trainer_free(alone);

    /* Two trainers in two threads at once: one made there, one made here and moved. */
    struct job a = {NULL, "thread-a", {0}, 0}, b = {new_trainer("thread-b", ""), "thread-b", {0}, 0};
    pthread_t ta, tb;
    CHECK(pthread_create(&ta, NULL, run_job, &a) == 0, "pthread_create");
    CHECK(pthread_create(&tb, NULL, run_job, &b) == 0, "pthread_create");
    pthread_join(ta, NULL);
    pthread_join(tb, NULL);
    CHECK(a.rc == 0 && b.rc == 0, "threads: %d %d", a.rc, b.rc);
    for (int s = 0; s < STEPS; s++)
        CHECK(a.losses[s] == want[s] && b.losses[s] == want[s], "step %d: %a %a vs %a", s,
              a.losses[s], b.losses[s], want[s]);
    recycle_trainer_free(a.t);
    recycle_trainer_free(b.t);

    /* The distilled run's teacher: thread-a, finished (resumed from its last checkpoint). */
    RecycleTrainer *t = NULL;
    char *r = recipe("thread-a", "");
    expect(recycle_trainer_new(r, RECYCLE_RESUME, &t), RECYCLE_OK, "", "resume thread-a");
    free(r);
    expect(recycle_trainer_finish(t, NULL), RECYCLE_OK, "", "finish thread-a");
    recycle_trainer_free(t);
    char extra[1024];
    snprintf(extra, sizeof extra, "[distill]\nteachers = [\"%s/thread-a\"]\nweight = 0.5\n",
             out_dir);
    t = new_trainer("student", extra);
    RecycleLogitsShape shape = {0, 0, 0};
    expect(recycle_trainer_teacher_logits_images(t, x, N * PIXELS, y, N, RECYCLE_LABELS_I32, N, 1,
                                                 28, 28, NULL, 0, &shape), RECYCLE_OK, "",
           "teacher logits: shape");
    CHECK(shape.teachers == 1 && shape.rows == N && shape.classes == 10, "shape %llu %llu %llu",
          (unsigned long long)shape.teachers, (unsigned long long)shape.rows,
          (unsigned long long)shape.classes);
    float logits[N * 10];
    expect(recycle_trainer_teacher_logits_images(t, x, N * PIXELS, y, N, RECYCLE_LABELS_I32, N, 1,
                                                 28, 28, logits, N * 10, &shape), RECYCLE_OK, "",
           "teacher logits");
    int finite = 1;
    for (int i = 0; i < N * 10; i++) finite &= isfinite(logits[i]) && logits[i] != 0.0f;
    CHECK(finite, "teacher logits are not all finite and nonzero");
    expect(recycle_trainer_teacher_logits_images(t, x, N * PIXELS, y, N, RECYCLE_LABELS_I32, N, 1,
                                                 28, 28, logits, 5, &shape),
           RECYCLE_ERROR_INVALID_ARGUMENT, "logits_len is 5", "teacher logits: short buffer");
    expect(recycle_trainer_step_images(t, x, N * PIXELS, y64, N, RECYCLE_LABELS_I64, N, 1, 28, 28,
                                       &st), RECYCLE_OK, "", "distilled step (int64 labels)");
    CHECK(st.teacher_forwards == 1 && isfinite(st.kd) && st.kd >= 0.0f && st.lr > 0.0f,
          "distilled step: %llu forwards, kd %f, lr %f", (unsigned long long)st.teacher_forwards,
          st.kd, st.lr);

    /* Bad input: a status and a message each, and nothing trains. */
    const int64_t big[N] = {1LL << 40, 0, 0, 0, 0, 0, 0, 0};
    int32_t bad[N];
    memcpy(bad, y, sizeof bad);
    bad[3] = 10;
    expect(recycle_trainer_step_images(NULL, x, N * PIXELS, y, N, 0, N, 1, 28, 28, &st),
           RECYCLE_ERROR_NULL_POINTER, "`trainer` is NULL", "NULL trainer");
    expect(recycle_trainer_step_images(t, NULL, N * PIXELS, y, N, 0, N, 1, 28, 28, &st),
           RECYCLE_ERROR_NULL_POINTER, "`images` is NULL", "NULL images");
    expect(recycle_trainer_step_images(t, x, N * PIXELS, NULL, N, 0, N, 1, 28, 28, &st),
           RECYCLE_ERROR_NULL_POINTER, "`labels` is NULL", "NULL labels");
    expect(recycle_trainer_step_images(t, x, N * PIXELS - 1, y, N, 0, N, 1, 28, 28, &st),
           RECYCLE_ERROR_INVALID_ARGUMENT, "images_len is 6271", "images_len short by one");
    expect(recycle_trainer_step_images(t, x, N * PIXELS, y, N - 1, 0, N, 1, 28, 28, &st),
           RECYCLE_ERROR_INVALID_ARGUMENT, "labels_len is 7", "labels_len short by one");
    expect(recycle_trainer_step_images(t, x, N * PIXELS, y, N, 7, N, 1, 28, 28, &st),
           RECYCLE_ERROR_INVALID_ARGUMENT, "index type 7 is unknown", "unknown label type");
    expect(recycle_trainer_step_images(t, x, N * PIXELS, y, N / 2, 0, N / 2, 2, 28, 28, &st),
           RECYCLE_ERROR_ENGINE, "takes [n, 1, height, width]", "two channels");
    expect(recycle_trainer_step_images(t, x, N * PIXELS, bad, N, 0, N, 1, 28, 28, &st),
           RECYCLE_ERROR_ENGINE, "labels[3] is 10, outside [0, 10)", "label out of range");
    expect(recycle_trainer_step_images(t, x, N * PIXELS, big, N, 1, N, 1, 28, 28, &st),
           RECYCLE_ERROR_INVALID_ARGUMENT, "outside the int32 range", "int64 label too big");
    expect(recycle_trainer_step_images(t, x, 0, y, 0, 0, 0, 1, 28, 28, &st),
           RECYCLE_ERROR_ENGINE, "has a zero", "empty batch");
    expect(recycle_trainer_step_images(t, x, N, y, 1ULL << 40, 0, 1ULL << 40, 1ULL << 40, 1ULL << 40,
                                       1, &st), RECYCLE_ERROR_INVALID_ARGUMENT, "more than size_t",
           "overflowing shape");
    expect(recycle_trainer_evaluate_images(t, x, N * PIXELS, y, N, 0, N, 1, 28, 28, NULL),
           RECYCLE_ERROR_NULL_POINTER, "`out` is NULL", "evaluate without out");
    expect(recycle_trainer_step_tokens(t, y, y, y, N, 0, 2, N / 2, &st), RECYCLE_ERROR_ENGINE,
           "a text batch for a ResNet student", "tokens for a ResNet");
    RecycleMetrics m = {0};
    expect(recycle_trainer_metrics(t, &m), RECYCLE_OK, "", "metrics");
    CHECK(m.step == 1 && m.teacher_forwards == 1, "after the bad calls: step %llu",
          (unsigned long long)m.step);
    recycle_trainer_free(t);

    /* BERT-tiny on token batches (int64 ids, mask and labels). */
    char bert[2048];
    snprintf(bert, sizeof bert,
             "name = \"mlm\"\nout_dir = \"%s\"\n[model]\nkind = \"bert\"\nsize = \"tiny\"\n"
             "[data]\ndataset = \"fortunes\"\nseq_len = 16\nvocab_size = 200\ntrain_limit = 64\n"
             "eval_limit = 16\n[train]\nbatch_size = 4\nsamples = 16\nevals = 1\n"
             "[optimizer]\nkind = \"adamw\"\nlr = 1e-3\n", out_dir);
    expect(recycle_trainer_new(bert, RECYCLE_OVERWRITE, &t), RECYCLE_OK, "", "BERT trainer");
    int64_t ids[64], mask[64], labels[64];
    for (int i = 0; i < 64; i++) {
        ids[i] = 5 + (i * 7) % 100;
        mask[i] = i < 60;
        labels[i] = i % 5 == 2 ? ids[i] : -100;
    }
    expect(recycle_trainer_step_tokens(t, ids, mask, labels, 64, RECYCLE_LABELS_I64, 4, 16, &st),
           RECYCLE_OK, "", "token step");
    CHECK(isfinite(st.loss) && isnan(st.kd), "token step: loss %f kd %f", st.loss, st.kd);
    expect(recycle_trainer_evaluate_tokens(t, ids, mask, labels, 64, RECYCLE_LABELS_I64, 4, 16,
                                           &ev), RECYCLE_OK, "", "token evaluation");
    CHECK(ev.rows == 13 && isfinite(ev.loss), "token evaluation: rows %llu",
          (unsigned long long)ev.rows);
    expect(recycle_trainer_step_tokens(t, ids, mask, labels, 63, RECYCLE_LABELS_I64, 4, 16, &st),
           RECYCLE_ERROR_INVALID_ARGUMENT, "len is 63", "token len short by one");
    expect(recycle_trainer_step_tokens(t, ids, NULL, labels, 64, RECYCLE_LABELS_I64, 4, 16, &st),
           RECYCLE_ERROR_NULL_POINTER, "`attention_mask` is NULL", "NULL attention mask");
    ids[9] = 100000;
    expect(recycle_trainer_step_tokens(t, ids, mask, labels, 64, RECYCLE_LABELS_I64, 4, 16, &st),
           RECYCLE_ERROR_ENGINE, "input_ids[9] is 100000", "token id outside the vocabulary");
    expect(recycle_trainer_teacher_logits_tokens(t, ids, mask, labels, 64, RECYCLE_LABELS_I64, 4,
                                                 16, NULL, 0, &shape), RECYCLE_ERROR_ENGINE,
           "has no teachers", "token teacher logits without teachers");
    recycle_trainer_free(t);

    printf("%d checks, %d failed\n", checks, failures);
    return failures == 0 ? 0 : 1;
}
