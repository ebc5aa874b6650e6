/*
 * Training on cuda:0 through the C ABI: the same tiny recipe trained step by step with
 * device = "cuda:0" and on the CPU; each step's loss must agree within gpu-check's f32
 * model-step tolerance (1e-4, relative). The final weights are compared by the harness.
 *
 * Usage: test_cuda OUT_DIR   (Fashion-MNIST found as for test_recycle.c)
 * Exit status: 0 when both runs trained and agree; 1 on a failed check; 77 when cuda:0 does
 * not open (a library built without the cuda feature, no driver): stdout then holds the
 * library's message. Built and run by bindings/c/tests/c_program_cuda.rs, which CI runs under
 * the mock CUDA (docs/mockcuda.md).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "recycle.h"

#define MAX_STEPS 64
#define LOSS_TOL 1e-4

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

static char *recipe(const char *name, const char *device, const char *out_dir) {
    const char *fmt =
        "name = \"%s\"\n"
        "out_dir = \"%s\"\n"
        "device = \"%s\"\n"
        "[model]\nkind = \"resnet\"\nwidth = 0.0625\n"
        "[data]\ndataset = \"fashion-mnist\"\ntrain_limit = 64\neval_limit = 32\n"
        "validation_fraction = 0.0\n"
        "[train]\nbatch_size = 16\nepochs = 1.0\nevals = 1\n"
        "[optimizer]\nkind = \"sgdw\"\nlr = 0.1\nweight_decay = 5e-4\nwarmup = 0.25\n";
    size_t n = strlen(fmt) + strlen(name) + strlen(out_dir) + strlen(device) + 1;
    char *s = malloc(n);
    snprintf(s, n, fmt, name, out_dir, device);
    return s;
}

/* Trains the recipe to its end one step at a time, writing each step's loss to `losses`;
 * returns the number of steps, or -1 (with the status in *status) when the trainer could
 * not be made. */
static int train(const char *text, float *losses, float *final_eval, int32_t *status) {
    RecycleTrainer *t = NULL;
    *status = recycle_trainer_new(text, RECYCLE_OVERWRITE, &t);
    if (*status != RECYCLE_OK) return -1;
    int n = 0;
    RecycleMetrics m;
    memset(&m, 0, sizeof m);
    do {
        uint64_t ran = 0;
        int32_t s = recycle_trainer_run_steps(t, 1, &ran);
        CHECK(s == RECYCLE_OK && ran == 1, "step %d: status %d (%s)", n + 1, (int)s,
              recycle_last_error());
        if (s != RECYCLE_OK || ran != 1) break;
        recycle_trainer_metrics(t, &m);
        if (n < MAX_STEPS) losses[n] = m.loss;
        n++;
    } while (!m.done && n < MAX_STEPS);
    int32_t s = recycle_trainer_finish(t, final_eval);
    CHECK(s == RECYCLE_OK, "finish: status %d (%s)", (int)s, recycle_last_error());
    recycle_trainer_free(t);
    return n;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s OUT_DIR\n", argv[0]);
        return 2;
    }
    float gpu[MAX_STEPS], cpu[MAX_STEPS], gpu_eval = -1.0f, cpu_eval = -1.0f;
    int32_t status = RECYCLE_OK;
    char *on_gpu = recipe("c-cuda", "cuda:0", argv[1]);
    int n_gpu = train(on_gpu, gpu, &gpu_eval, &status);
    free(on_gpu);
    if (n_gpu < 0) {
        printf("cuda:0 does not open: status %d: %s\n", (int)status, recycle_last_error());
        return status == RECYCLE_ERROR_ENGINE ? 77 : 1;
    }
    char *on_cpu = recipe("c-cpu", "cpu", argv[1]);
    int n_cpu = train(on_cpu, cpu, &cpu_eval, &status);
    free(on_cpu);
    CHECK(n_cpu >= 0, "the CPU run: status %d: %s", (int)status, recycle_last_error());
    CHECK(n_gpu == 4 && n_cpu == n_gpu, "steps: %d on cuda:0, %d on the CPU", n_gpu, n_cpu);
    for (int i = 0; i < n_gpu && i < n_cpu; i++) {
        double err = fabs((double)gpu[i] - cpu[i]) / fabs((double)cpu[i]);
        printf("  step %d: loss %.6f on cuda:0, %.6f on the CPU (error %.2e)\n", i + 1, gpu[i],
               cpu[i], err);
        CHECK(isfinite(gpu[i]) && err <= LOSS_TOL, "step %d: error %.2e > %.0e", i + 1, err,
              LOSS_TOL);
    }
    CHECK(gpu_eval >= 0.0f && gpu_eval <= 1.0f, "final accuracy on cuda:0: %f", gpu_eval);
    printf("%d checks, %d failed\n", checks, failures);
    return failures == 0 ? 0 : 1;
}
