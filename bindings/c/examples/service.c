/* A training service in C: it makes its own batches (28x28 images with labels) and feeds them
 * to a trainer built from a recipe, step by step, until the recipe's run is done.
 * Usage: service RECIPE.toml CHECKPOINT_OUT   (prints each step's losses as float bits) */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "recycle.h"

#define N 16
#define PIXELS (28 * 28)

static int fail(const char *what) {
    fprintf(stderr, "%s: %s\n", what, recycle_last_error());
    return 1;
}

static uint32_t bits(float v) { uint32_t b; memcpy(&b, &v, sizeof b); return b; }

/* Batch `step`: label (3 step + i) mod 10, pixels from a fixed integer pattern. */
static void make_batch(uint64_t step, float *x, int32_t *y) {
    for (uint64_t i = 0; i < N; i++) {
        y[i] = (int32_t)((3 * step + i) % 10);
        for (uint64_t j = 0; j < PIXELS; j++)
            x[i * PIXELS + j] = (float)((j * 31 + i * 13 + step * 7 + (uint64_t)y[i] * 97) % 251) / 250.0f;
    }
}

int main(int argc, char **argv) {
    if (argc != 3) return fprintf(stderr, "usage: service RECIPE.toml CHECKPOINT_OUT\n"), 2;
    static char recipe[1 << 16];
    FILE *f = fopen(argv[1], "r");
    if (!f) return fprintf(stderr, "cannot open %s\n", argv[1]), 1;
    recipe[fread(recipe, 1, sizeof recipe - 1, f)] = '\0';
    fclose(f);

    RecycleTrainer *t = NULL;
    if (recycle_trainer_new(recipe, RECYCLE_OVERWRITE, &t) != RECYCLE_OK) return fail("new");
    static float x[N * PIXELS];
    int32_t y[N];
    RecycleMetrics m = {0};
    for (uint64_t s = 0; !m.done; s++) {
        RecycleStep out = {0};
        make_batch(s, x, y);
        if (recycle_trainer_step_images(t, x, N * PIXELS, y, N, RECYCLE_LABELS_I32, N, 1, 28, 28,
                                        &out) != RECYCLE_OK) return fail("step");
        printf("step %llu loss %08x ce %08x kd %08x teachers %llu\n", (unsigned long long)out.step,
               bits(out.loss), bits(out.ce), bits(out.kd), (unsigned long long)out.teacher_forwards);
        if (recycle_trainer_metrics(t, &m) != RECYCLE_OK) return fail("metrics");
    }
    if (recycle_trainer_save_checkpoint(t, argv[2]) != RECYCLE_OK) return fail("save");
    float acc = 0.0f;
    if (recycle_trainer_finish(t, &acc) != RECYCLE_OK) return fail("finish");
    printf("final accuracy %.4f\n", acc);
    recycle_trainer_free(t);
    return 0;
}
