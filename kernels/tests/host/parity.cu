// Host-side harness for tests/host_parity.rs: runs the kernels' shared `__host__ __device__`
// math (common.cuh, and the element functions of optimizers.cu and kd_loss.cu) on the CPU, so
// that it can be compared with the engine's CPU twins without a GPU. It also emulates the
// per-row structure of kd_loss_row (strided per-thread accumulation, then merging) with the
// same helpers.
//
// What this does not cover: the kernels' parallel skeletons (indexing, shuffles, barriers,
// shared memory) and the device's own expf/logf. Those need the device check on a GPU.
//
// Protocol: the mode is argv[1]; inputs come on stdin and results go to stdout, one record a
// line, floats as the hex of their bits so that nothing is lost in printing.

#include "kd_loss.cu"
#include "optimizers.cu"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <vector>

using namespace rk;

static float f_of(uint32_t bits) {
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static uint32_t bits_of(float f) {
    uint32_t b;
    memcpy(&b, &f, 4);
    return b;
}

static float read_f() {
    unsigned int b;
    if (scanf("%x", &b) != 1) {
        fprintf(stderr, "parity: expected a float (hex bits)\n");
        exit(2);
    }
    return f_of(b);
}

static long long read_i() {
    long long v;
    if (scanf("%lld", &v) != 1) {
        fprintf(stderr, "parity: expected an integer\n");
        exit(2);
    }
    return v;
}

// rng: lines "seed index p" (seed and index in hex) -> "bits uniform keep".
static void mode_rng() {
    unsigned long long seed, index;
    while (scanf("%llx %llx", &seed, &index) == 2) {
        const float p = read_f();
        const uint64_t key = stream_key(seed);
        printf("%016llx %08x %d\n", (unsigned long long)bits_at_key(key, index),
               bits_of(uniform_at_key(key, index)), dropout_keep(key, index, p) ? 1 : 0);
    }
}

// bf16: lines "f32" -> "bf16_bits widened_f32".
static void mode_bf16() {
    unsigned int b;
    while (scanf("%x", &b) == 1) {
        const bf16 h = from_f32<bf16>(f_of(b));
        uint16_t hb;
        memcpy(&hb, &h, 2);
        printf("%04x %08x\n", hb, bits_of(to_f32(h)));
    }
}

// sgdw: "lr decay momentum grad_weight nesterov first", then lines "param grad buf"
// -> "param buf".
static void mode_sgdw() {
    const float lr = read_f(), decay = read_f(), momentum = read_f(), grad_weight = read_f();
    const int nesterov = (int)read_i(), first = (int)read_i();
    unsigned int pb, gb, bb;
    while (scanf("%x %x %x", &pb, &gb, &bb) == 3) {
        // As sgdw_step_*: the buffer is not read on the first step.
        float buf = momentum != 0.0f && !first ? f_of(bb) : 0.0f;
        const float p = sgdw_element(f_of(pb), f_of(gb), &buf, lr, decay, momentum, grad_weight,
                                     nesterov, first);
        printf("%08x %08x\n", bits_of(p), bits_of(momentum != 0.0f ? buf : f_of(bb)));
    }
}

// adamw: "decay grad_weight beta2 sq_weight neg_step_size bias_correction2_sqrt eps", then
// lines "param grad m v" -> "param m v".
static void mode_adamw() {
    const float decay = read_f(), grad_weight = read_f(), beta2 = read_f(), sq_weight = read_f();
    const float neg_step = read_f(), bc2 = read_f(), eps = read_f();
    unsigned int pb, gb, mb, vb;
    while (scanf("%x %x %x %x", &pb, &gb, &mb, &vb) == 4) {
        float m = f_of(mb), v = f_of(vb);
        const float p = adamw_element(f_of(pb), f_of(gb), &m, &v, decay, grad_weight, beta2,
                                      sq_weight, neg_step, bc2, eps);
        printf("%08x %08x %08x\n", bits_of(p), bits_of(m), bits_of(v));
    }
}

// The block-wide merge of `threads` per-thread states, in block_lse's order: a butterfly within
// each warp of 32, then the same over the warps' results.
static Lse merge_like_block(std::vector<Lse> st) {
    const size_t threads = st.size();
    for (size_t w = 0; w < threads; w += 32) {
        for (int o = 16; o > 0; o >>= 1) {
            std::vector<Lse> next(st.begin() + w, st.begin() + w + 32);
            for (int lane = 0; lane < 32; ++lane)
                next[lane] = lse_merge(st[w + lane], st[w + (lane ^ o)]);
            std::copy(next.begin(), next.end(), st.begin() + w);
        }
    }
    std::vector<Lse> warps(32, lse_empty());
    for (size_t w = 0; w < threads / 32; ++w) warps[w] = st[w * 32];
    for (int o = 16; o > 0; o >>= 1) {
        std::vector<Lse> next(warps);
        for (int lane = 0; lane < 32; ++lane) next[lane] = lse_merge(warps[lane], warps[lane ^ o]);
        warps = next;
    }
    return warps[0];
}

// lse: lines "threads n v1 .. vn" -> "lse".
static void mode_lse() {
    long long threads;
    while (scanf("%lld", &threads) == 1) {
        const long long n = read_i();
        std::vector<Lse> st(threads, lse_empty());
        for (long long j = 0; j < n; ++j) st[j % threads] = lse_push(st[j % threads], read_f());
        printf("%08x\n", bits_of(lse_value(merge_like_block(st))));
    }
}

// kd: one row per record:
//   "kind classes k label ignore_index threads" then "inv_t t_sq ce_weight kd_scale",
//   the student's C logits, then k lines of C teacher logits
// -> "row_ce row_kd" and a line of C gradient values. Mirrors kd_loss_row for an f32 student
// and f32 teachers, with `threads` virtual threads striding over the row.
static void mode_kd() {
    long long kind;
    while (scanf("%lld", &kind) == 1) {
        const uint32_t classes = (uint32_t)read_i(), k = (uint32_t)read_i();
        const int32_t y = (int32_t)read_i(), ignore_index = (int32_t)read_i();
        const uint32_t threads = (uint32_t)read_i();
        const float inv_t = read_f(), t_sq = read_f(), ce_weight = read_f(),
                    kd_scale = read_f();
        std::vector<float> s(classes);
        for (auto& v : s) v = read_f();
        std::vector<std::vector<float>> t(k, std::vector<float>(classes));
        for (auto& row : t)
            for (auto& v : row) v = read_f();
        TeacherLogits tl{};
        for (uint32_t q = 0; q < k; ++q) tl.p[q] = t[q].data();

        const bool has_label = y != ignore_index;
        const bool valid = has_label && y >= 0 && (uint32_t)y < classes;
        std::vector<Lse> a_s(threads, lse_empty()), a_ss(threads, lse_empty()),
            a_tt(threads, lse_empty());
        float label_logit = 0.0f;
        for (uint32_t j = 0; j < classes; ++j) {
            const uint32_t th = j % threads;
            const float sv = s[j];
            if (valid) {
                a_s[th] = lse_push(a_s[th], sv);
                if (j == (uint32_t)y) label_logit = sv;
            }
            if (kind == KD_KL) {
                a_ss[th] = lse_push(a_ss[th], mul_rn(sv, inv_t));
                a_tt[th] = lse_push(a_tt[th], mul_rn(teacher_mean<float>(tl, k, exact_inv(k), j), inv_t));
            }
        }
        float lse = 0.0f, lse_s = 0.0f, lse_t = 0.0f;
        if (valid) lse = lse_value(merge_like_block(a_s));
        if (kind == KD_KL) {
            lse_s = lse_value(merge_like_block(a_ss));
            lse_t = lse_value(merge_like_block(a_tt));
        }
        std::vector<float> acc(threads, 0.0f), grad(classes);
        for (uint32_t j = 0; j < classes; ++j) {
            const float sv = s[j];
            float g = valid ? kd_grad_ce(sv, lse, j == (uint32_t)y, ce_weight) : 0.0f;
            if (kind == KD_KL)
                acc[j % threads] += kd_kl_element(sv, teacher_mean<float>(tl, k, exact_inv(k), j), inv_t,
                                                  lse_s, lse_t, kd_scale, &g);
            if (kind == KD_MSE)
                acc[j % threads] += kd_mse_element(sv, teacher_mean<float>(tl, k, exact_inv(k), j), kd_scale, &g);
            grad[j] = g;
        }
        float total = 0.0f;
        for (float a : acc) total += a;
        const float row_ce = valid ? sub_rn(lse, label_logit) : (has_label ? NAN : 0.0f);
        const float row_kd = kind == KD_KL    ? mul_rn(total, t_sq)
                             : kind == KD_MSE ? div_rn(total, (float)classes)
                                              : 0.0f;
        printf("%08x %08x\n", bits_of(row_ce), bits_of(row_kd));
        for (uint32_t j = 0; j < classes; ++j) printf("%08x%c", bits_of(grad[j]), j + 1 < classes ? ' ' : '\n');
    }
}

int main(int argc, char** argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: parity rng|bf16|sgdw|adamw|lse|kd < input\n");
        return 2;
    }
    const char* m = argv[1];
    if (!strcmp(m, "rng")) mode_rng();
    else if (!strcmp(m, "bf16")) mode_bf16();
    else if (!strcmp(m, "sgdw")) mode_sgdw();
    else if (!strcmp(m, "adamw")) mode_adamw();
    else if (!strcmp(m, "lse")) mode_lse();
    else if (!strcmp(m, "kd")) mode_kd();
    else {
        fprintf(stderr, "parity: unknown mode %s\n", m);
        return 2;
    }
    return 0;
}
