/* backend="cpu": the block-sparse forward and backward, in AVX2 + FMA (fp32).

   Compiled on first use by native.py with the machine's C compiler; without a compiler or
   AVX2 the backend keeps ATen's kernel (fused.py). One call runs a whole task list: a task
   is one (batch-and-kv-head pair g, query block qb, query head r) with its key blocks, read
   in place through their indices (no gather). Per sub-tile of at most QT query rows it
   streams the key blocks in chunks of at most KC keys: S = (q scale) K^T in a 6 x 16
   register tile, + the additive mask, an online softmax (running max and sum per row), and
   O = O alpha + P V in a 6 x 16 register tile, so scores never leave the L1/L2 caches.
   The backward (bwd_item) recomputes P from the forward's lse over the same tasks.

   Layouts (fp32): q [B, H, Nq, D] and the output o, lse [B, H, Nq(, D)] in the caller's
   token order, the rows of query block qb at qpos[qb bq ..] (written where qvalid; rows
   without a key get o = 0 and lse = -inf); kt [G, nkb, D, bk] (G = B HKV pairs; k transposed
   per block, packed by attndsl_pack); v [B, HKV, Nk, D] read in place: position j of key
   block kb of pair g (b = g / HKV, hk = g % HKV) is the row kpos[kb bk + j] of (b, hk).
   tasks [T, 8] int64: g, qb, r (query head hk R + r), the address of the key-block ids,
   their number (slots), the address of the mask (0: none; [bq, slots bk] at row stride
   mw: additive floats, or with `bits` one bit an entry, 1 where attended), mw, and the
   address of one byte per slot, 1 where the mask applies (0: every slot). */

#include <immintrin.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define QT 64   /* query rows per sub-tile */
#define KC 256  /* keys per softmax chunk (at least one block: bk <= KC) */
#define TASK 8  /* int64s per task */

typedef struct {
    const float *q;
    float *o, *lse;
    int64_t sq_b, sq_h, sq_n, nq;
    const int64_t *qpos;
    const uint8_t *qvalid;
    const float *kt, *v;
    int64_t sv_b, sv_h, sv_n;
    const int64_t *kpos;  /* [nkb bk] */
    const int64_t *tasks;
    int64_t ntasks, H, HKV, R, nqb, bq, D, nkb, bk;
    float scale;
    int threads;
    int bits;  /* the masks are bits (1: attended), not additive floats */
} fwd_args;

typedef struct {
    const float *x;  /* [B, HKV, N, D] at strides sx_* (D contiguous) */
    int64_t sx_b, sx_h, sx_n;
    const int64_t *pos;  /* [nkb bk]: the row of x at each block position */
    float *out;  /* [G, nkb, D, bk] */
    int64_t G, HKV, nkb, bk, D;
    int threads;
} pack_args;

/* Runs fn(arg, i, scratch, thread) for i < n on `threads` threads, each taking the next
   run of consecutive i (a share of what is left, smaller towards the end): neighbouring
   query blocks share most of their key blocks, so a core keeps them in its L2 (2-13% faster
   forwards than one i at a time on na2d, na3d and sliding_window, 2-core EPYC). */
typedef void (*item_fn)(const void *, int64_t, void *, int);
typedef struct {
    item_fn fn;
    const void *arg;
    int64_t n, next;
    size_t scratch;
    int ids, threads;
} pool_t;

static void *pool_worker(void *p) {
    pool_t *P = (pool_t *)p;
    const int id = __atomic_fetch_add(&P->ids, 1, __ATOMIC_RELAXED);
    void *w = P->scratch ? aligned_alloc(64, (P->scratch + 63) / 64 * 64) : NULL;
    if (P->scratch && !w) return NULL;  /* the other threads take the work */
    int64_t i = __atomic_load_n(&P->next, __ATOMIC_RELAXED), take;
    for (;;) {
        do {
            if (i >= P->n) goto done;
            take = (P->n - i) / (2 * P->threads);
            if (take < 1) take = 1;
        } while (!__atomic_compare_exchange_n(&P->next, &i, i + take, 1, __ATOMIC_RELAXED,
                                              __ATOMIC_RELAXED));
        for (int64_t j = i; j < i + take; j++) P->fn(P->arg, j, w, id);
        i = __atomic_load_n(&P->next, __ATOMIC_RELAXED);
    }
done:
    free(w);
    return NULL;
}

static void parallel(int threads, int64_t n, size_t scratch, item_fn fn, const void *arg) {
    if (threads > 64) threads = 64;
    if (threads > n) threads = (int)(n > 0 ? n : 1);
    pool_t P = {fn, arg, n, 0, scratch, 0, threads};
#ifdef _OPENMP
    /* torch's own OpenMP threads (the process's one libgomp): a pool of our own would race
       them for the cores while they spin after torch's last parallel op. */
#pragma omp parallel num_threads(threads)
    pool_worker(&P);
#else
    pthread_t th[64];
    int started = 0;
    for (int i = 1; i < threads; i++)
        if (pthread_create(&th[started], NULL, pool_worker, &P) == 0) started++;
    pool_worker(&P);
    for (int i = 0; i < started; i++) pthread_join(th[i], NULL);
#endif
}

#define LOG2E 1.44269504088896341f

/* e^(x - m) for x <= m as 2^t, t = (x - m) log2(e) (x - m first: x log2(e) - m log2(e)
   would lose digits to cancellation when |m| is large): n = round(t), 2^(t - n) by a
   degree-5 polynomial (relative error 2.3e-7 in fp32), times 2^n through the exponent
   bits; exactly 0 below 2^-125 and at x = -inf. */
static inline __m256 exp_ps(__m256 x, __m256 m) {
    const __m256 lo = _mm256_set1_ps(-125.0f);
    __m256 t = _mm256_mul_ps(_mm256_sub_ps(x, m), _mm256_set1_ps(LOG2E));
    const __m256 dead = _mm256_cmp_ps(t, lo, _CMP_LT_OQ);
    t = _mm256_max_ps(t, lo);
    const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 f = _mm256_sub_ps(t, n);
    __m256 p = _mm256_set1_ps(1.327645150013268e-3f);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.675540961325169e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550713464617729e-2f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022120237350464e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931469440460205e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0000001192092896f));
    const __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
    p = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
    return _mm256_andnot_ps(dead, p);
}

static inline float hmax(__m256 x) {
    __m128 a = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    a = _mm_max_ps(a, _mm_movehl_ps(a, a));
    a = _mm_max_ss(a, _mm_shuffle_ps(a, a, 1));
    return _mm_cvtss_f32(a);
}

static inline float hsum(__m256 x) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    a = _mm_add_ps(a, _mm_movehl_ps(a, a));
    a = _mm_add_ss(a, _mm_shuffle_ps(a, a, 1));
    return _mm_cvtss_f32(a);
}

/* c[i] += a[i sa] (b0, b1), rows i < M <= 6: one step of both register tiles. */
static inline __attribute__((always_inline)) void fma_rows(
        int M, const float *a, int64_t sa, __m256 b0, __m256 b1, __m256 c[6][2]) {
    for (int i = 0; i < 6; i++) {
        if (i < M) {
            const __m256 x = _mm256_broadcast_ss(a + i * sa);
            c[i][0] = _mm256_fmadd_ps(x, b0, c[i][0]);
            c[i][1] = _mm256_fmadd_ps(x, b1, c[i][1]);
        }
    }
}

/* s[i, 0:16] (row stride ss) = sum_d a[i, d] b[d, 0:16] (row stride sb), masked by mk
   (NULL: none): with bits, -inf where bit j of the 16 at mk + i sm is 0; else + the floats
   mk[i sm + 0:16]. Rows i < M <= 6; vm[i] (8 lanes) takes their running max. */
static inline __attribute__((always_inline)) void tile_qk(
        int M, const float *a, int64_t D, const float *b, int64_t sb, const void *mk,
        int64_t sm, int bits, float *s, int64_t ss, float *vm) {
    __m256 c[6][2];
    for (int i = 0; i < 6; i++) c[i][0] = c[i][1] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d++) {
        fma_rows(M, a + d, D, _mm256_loadu_ps(b + d * sb), _mm256_loadu_ps(b + d * sb + 8), c);
    }
    for (int i = 0; i < 6; i++) {
        if (i < M) {
            if (mk && bits) {
                const __m256i lo = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
                const __m256i hi = _mm256_slli_epi32(lo, 8);
                const __m256 ninf = _mm256_set1_ps(-INFINITY);
                uint16_t w16;
                memcpy(&w16, (const uint8_t *)mk + i * sm, 2);
                const __m256i x = _mm256_set1_epi32(w16);
                __m256 on0 = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(x, lo), lo));
                __m256 on1 = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(x, hi), hi));
                c[i][0] = _mm256_blendv_ps(ninf, c[i][0], on0);
                c[i][1] = _mm256_blendv_ps(ninf, c[i][1], on1);
            } else if (mk) {
                const float *f = (const float *)mk + i * sm;
                c[i][0] = _mm256_add_ps(c[i][0], _mm256_loadu_ps(f));
                c[i][1] = _mm256_add_ps(c[i][1], _mm256_loadu_ps(f + 8));
            }
            _mm256_storeu_ps(s + i * ss, c[i][0]);
            _mm256_storeu_ps(s + i * ss + 8, c[i][1]);
            __m256 m = _mm256_max_ps(_mm256_load_ps(vm + 8 * i),
                                     _mm256_max_ps(c[i][0], c[i][1]));
            _mm256_store_ps(vm + 8 * i, m);
        }
    }
}

/* o[i, c0:c0 + 16] (row stride D) = o[i, c0:c0 + 16] al[i] + sum_j p[i sp + j sj]
   x_j[c0:c0 + 16], j < n, rows i < M; x_j at rows[j] (the rows of v, k, q or dO where they
   lie). sj = 1 reads p row by row; sp = 1 reads it transposed (dS^T, P^T). */
static inline __attribute__((always_inline)) void tile_pv(
        int M, const float *p, int64_t sp, int64_t sj, const float *const *rows, int64_t n,
        int64_t D, int64_t c0, const float *al, float *o) {
    __m256 c[6][2];
    for (int i = 0; i < 6; i++) {
        if (i < M) {
            __m256 a = _mm256_broadcast_ss(al + i);
            c[i][0] = _mm256_mul_ps(a, _mm256_loadu_ps(o + i * D + c0));
            c[i][1] = _mm256_mul_ps(a, _mm256_loadu_ps(o + i * D + c0 + 8));
        }
    }
    for (int64_t j = 0; j < n; j++) {
        const float *x = rows[j] + c0;
        fma_rows(M, p + j * sj, sp, _mm256_loadu_ps(x), _mm256_loadu_ps(x + 8), c);
    }
    for (int i = 0; i < 6; i++) {
        if (i < M) {
            _mm256_storeu_ps(o + i * D + c0, c[i][0]);
            _mm256_storeu_ps(o + i * D + c0 + 8, c[i][1]);
        }
    }
}

/* The rows of the register tile at row i of n: groups of 6 rows or fewer, as even as can
   be (16 = 6 + 5 + 5, not 6 + 6 + 4: a 4-row tile keeps 8 sums in flight, fewer than two
   FMA pipes of latency 4-5 need; no change measurable on na2d, kept for the reason). */
static inline int64_t tile_rows(int64_t i, int64_t n) {
    const int64_t left = n - i, groups = (left + 5) / 6;
    return (left + groups - 1) / groups;
}

#define DISPATCH(M, CALL)                 \
    switch (M) {                          \
        case 6: { const int m_ = 6; CALL; } break; \
        case 5: { const int m_ = 5; CALL; } break; \
        case 4: { const int m_ = 4; CALL; } break; \
        case 3: { const int m_ = 3; CALL; } break; \
        case 2: { const int m_ = 2; CALL; } break; \
        default: { const int m_ = 1; CALL; } break; \
    }

typedef struct {
    float *qs, *s, *o, *m, *l, *al, *vm;
    const float **vr;  /* [KC]: the chunk's v rows */
} scratch_t;

/* rows[slot bk + j] = x's row of position j of key block kid[slot], slots < nsl (x: the
   pair's rows at row stride sx). */
static inline void key_rows(const fwd_args *J, const int64_t *kid, int64_t nsl, const float *x,
                            int64_t sx, const float **rows) {
    const int64_t bk = J->bk;
    for (int64_t s = 0; s < nsl; s++) {
        const int64_t *pos = J->kpos + kid[s] * bk;
        for (int64_t j = 0; j < bk; j++) rows[s * bk + j] = x + pos[j] * sx;
    }
}

/* The mask of a task's slot at row r0 (NULL: the slot needs none), and of its row i, key
   j within the slot (bits: one byte holds 8 keys; bk and j are multiples of 16). */
static inline const void *slot_mask(const fwd_args *J, const int64_t *t, int64_t r0,
                                    int64_t slot) {
    const void *mask = (const void *)(intptr_t)t[5];
    const uint8_t *part = (const uint8_t *)(intptr_t)t[7];
    if (!mask || (part && !part[slot])) return NULL;
    const int64_t at = r0 * t[6] + slot * J->bk;
    return J->bits ? (const void *)((const uint8_t *)mask + at / 8)
                   : (const void *)((const float *)mask + at);
}

static inline const void *key_mask(const fwd_args *J, const void *mk, int64_t mw, int64_t i,
                                   int64_t j) {
    if (!mk) return NULL;
    return J->bits ? (const void *)((const uint8_t *)mk + (i * mw + j) / 8)
                   : (const void *)((const float *)mk + i * mw + j);
}

/* One work item of a call: rows r0 .. r0 + nr - 1 (nr <= QT) of a task, decoded. */
typedef struct {
    const int64_t *t, *kid, *qpos;  /* the task, its key-block ids, its rows' q rows */
    const uint8_t *valid;  /* 1 where a row is a real query (not padding of the last block) */
    int64_t r0, nr, g, b, hk, h, slots, base;  /* base: (b, h)'s first row of o, lse, dq */
} item_t;

/* Items a task is cut into. */
static inline int64_t subs(const fwd_args *J) { return (J->bq + QT - 1) / QT; }

/* Item k: sub-tile k % subs of task k / subs. */
static item_t item(const fwd_args *J, int64_t k) {
    item_t u;
    u.t = J->tasks + (k / subs(J)) * TASK;
    u.r0 = (k % subs(J)) * QT;
    u.nr = J->bq - u.r0 < QT ? J->bq - u.r0 : QT;
    u.g = u.t[0];
    u.b = u.g / J->HKV;
    u.hk = u.g % J->HKV;
    u.h = u.hk * J->R + u.t[2];
    u.slots = u.t[4];
    u.kid = (const int64_t *)(intptr_t)u.t[3];
    u.qpos = J->qpos + u.t[1] * J->bq + u.r0;
    u.valid = J->qvalid + u.t[1] * J->bq + u.r0;
    u.base = (u.b * J->H + u.h) * J->nq;
    return u;
}

/* Whether flash.c refuses these arguments: D % 16 == 0, bk % 16 == 0, bk <= KC needed. */
static int rejects(const fwd_args *J) {
    return J->D % 16 || J->bk % 16 || J->bk > KC || J->D > 1024 || J->threads < 1;
}

/* qs[i] = q's row qpos[i] of (batch b, head h) times the scale, rows i < nr. */
static void load_q(const fwd_args *J, int64_t b, int64_t h, const int64_t *qpos, int64_t nr,
                   float *qs) {
    const float *q = J->q + b * J->sq_b + h * J->sq_h;
    const __m256 sc = _mm256_set1_ps(J->scale);
    for (int64_t i = 0; i < nr; i++) {
        const float *qi = q + qpos[i] * J->sq_n;
        for (int64_t c = 0; c < J->D; c += 8)
            _mm256_storeu_ps(qs + i * J->D + c, _mm256_mul_ps(sc, _mm256_loadu_ps(qi + c)));
    }
}

/* s[i, slot bk + j] = (q scale) K^T + mask for a chunk's key blocks (slots s0 .. s0 + nsl
   - 1 of task t, rows r0 .. r0 + nr - 1, row stride KC); vm[i] takes each row's max. */
static void chunk_scores(const fwd_args *J, const int64_t *t, int64_t r0, int64_t nr,
                         int64_t s0, int64_t nsl, const float *qs, float *s, float *vm) {
    const int64_t D = J->D, bk = J->bk, g = t[0], mw = t[6];
    const int64_t *kid = (const int64_t *)(intptr_t)t[3];
    for (int64_t q_ = 0; q_ < nsl; q_++) {
        const float *kt = J->kt + (g * J->nkb + kid[s0 + q_]) * D * bk;
        const void *mk = slot_mask(J, t, r0, s0 + q_);
        for (int64_t i = 0, M; i < nr; i += M) {
            M = tile_rows(i, nr);
            for (int64_t j = 0; j < bk; j += 16) {
                const void *mij = key_mask(J, mk, mw, i, j);
                DISPATCH(M, tile_qk(m_, qs + i * D, D, kt + j, bk, mij,
                                    J->bits ? mw / 8 : mw, J->bits, s + i * KC + q_ * bk + j,
                                    KC, vm + 8 * i))
            }
        }
    }
}

/* One item's rows against all its task's key blocks. */
static void run_rows(const fwd_args *J, const item_t *u, scratch_t *W) {
    const int64_t D = J->D, bk = J->bk, nr = u->nr, slots = u->slots;
    const int64_t *kid = u->kid;
    const float *vg = J->v + u->b * J->sv_b + u->hk * J->sv_h;
    load_q(J, u->b, u->h, u->qpos, nr, W->qs);
    memset(W->o, 0, sizeof(float) * nr * D);
    for (int64_t i = 0; i < nr; i++) { W->m[i] = -INFINITY; W->l[i] = 0.0f; }
    const int64_t per = KC / bk;  /* key blocks per chunk */
    for (int64_t s0 = 0; s0 < slots; s0 += per) {
        const int64_t nsl = s0 + per < slots ? per : slots - s0, w = nsl * bk;
        const __m256 ninf = _mm256_set1_ps(-INFINITY);
        for (int64_t i = 0; i < nr; i++) _mm256_store_ps(W->vm + 8 * i, ninf);
        key_rows(J, kid + s0, nsl, vg, J->sv_n, W->vr);
        chunk_scores(J, u->t, u->r0, nr, s0, nsl, W->qs, W->s, W->vm);
        for (int64_t i = 0; i < nr; i++) {
            float *si = W->s + i * KC;
            float mnew = hmax(_mm256_load_ps(W->vm + 8 * i)), mold = W->m[i];
            if (mold > mnew) mnew = mold;
            if (mnew == -INFINITY) {  /* no key yet: P = 0, nothing to rescale */
                memset(si, 0, sizeof(float) * w);
                W->al[i] = 1.0f;
                continue;
            }
            const __m256 mb = _mm256_set1_ps(mnew);
            __m256 acc = _mm256_setzero_ps();
            for (int64_t j = 0; j < w; j += 8) {
                __m256 e = exp_ps(_mm256_loadu_ps(si + j), mb);
                _mm256_storeu_ps(si + j, e);
                acc = _mm256_add_ps(acc, e);
            }
            float alpha = mold == -INFINITY ? 0.0f : expf(mold - mnew);
            W->al[i] = alpha;
            W->l[i] = W->l[i] * alpha + hsum(acc);
            W->m[i] = mnew;
        }
        for (int64_t i = 0, M; i < nr; i += M) {
            M = tile_rows(i, nr);
            for (int64_t c = 0; c < D; c += 16) {
                DISPATCH(M, tile_pv(m_, W->s + i * KC, KC, 1, W->vr, w, D, c, W->al + i,
                                    W->o + i * D))
            }
        }
    }
    for (int64_t i = 0; i < nr; i++) {
        if (!u->valid[i]) continue;  /* a padding position of the last block */
        const float l = W->l[i];
        const __m256 inv = _mm256_set1_ps(l > 0.0f ? 1.0f / l : 0.0f);
        const int64_t row = u->base + u->qpos[i];
        float *o = J->o + row * D;
        for (int64_t c = 0; c < D; c += 8)
            _mm256_storeu_ps(o + c, _mm256_mul_ps(inv, _mm256_loadu_ps(W->o + i * D + c)));
        J->lse[row] = l > 0.0f ? W->m[i] + logf(l) : -INFINITY;
    }
}

static void fwd_item(const void *arg, int64_t k, void *mem, int tid) {
    (void)tid;
    const fwd_args *J = (const fwd_args *)arg;
    const int64_t D = J->D;
    float *buf = (float *)mem;
    const float *vr[KC];
    scratch_t W = {buf, buf + QT * D + QT * D, buf + QT * D, NULL, NULL, NULL, NULL, vr};
    W.m = W.s + QT * KC;
    W.l = W.m + QT;
    W.al = W.l + QT;
    W.vm = W.al + QT;  /* 8 lanes a row */
    const item_t u = item(J, k);
    run_rows(J, &u, &W);
}

/* Runs every task (each cut into items of QT query rows); 1 when it rejects its
   arguments (rejects), else 0. */
int attndsl_flash_fwd(const fwd_args *J) {
    if (rejects(J)) return 1;
    const size_t bytes = sizeof(float) * (QT * J->D * 2 + QT * KC + 11 * QT);
    parallel(J->threads, J->ntasks * subs(J), bytes, fwd_item, J);
    return 0;
}

/* The backward of a forward's tasks: per task sub-tile, the probabilities recomputed from
   the forward's lse, P = exp(S - lse), dP = dO V^T, dS = P (dP - delta) with delta =
   rowsum(dO O); dQ = scale dS K written to the task's rows, and dK += dS^T (q scale),
   dV += P^T dO added into this thread's own accumulators (acc[thread] = [2, G, nkb, bk, D]:
   dk, dv; a block's zeroed on the thread's first use, marked in touched), which
   attndsl_unpack sums afterwards, so tasks never race. */
typedef struct {
    fwd_args f;  /* q, o (the forward's output), lse, tasks ... as the forward had them */
    const float *dout;  /* [B, H, Nq, D] at strides sd_* */
    int64_t sd_b, sd_h, sd_n;
    const float *k;  /* [B, HKV, Nk, D] in place, at strides sk_* (its rows at kpos, as v's) */
    int64_t sk_b, sk_h, sk_n;
    const float *vt;  /* [G, nkb, D, bk]: v transposed per block */
    float *dq;  /* [B, H, Nq, D] */
    float *acc;  /* [threads, 2, G, nkb, bk, D], zeroed per block on first use */
    uint8_t *touched;  /* [threads, G, nkb], 0: 1 where the thread's block is in use */
    int64_t G;
} bwd_args;

/* Per task sub-tile: qs = q scale, dot = dO (0 at padding positions, which then add
   nothing to dk and dv), their delta and lse (+inf without a key: P = 0). */
static void bwd_rows(const bwd_args *B, const item_t *u, float *qs, float *dot, float *delta,
                     float *lse) {
    const fwd_args *J = &B->f;
    const int64_t D = J->D, b = u->b, h = u->h, base = u->base, nr = u->nr;
    const int64_t *qpos = u->qpos;
    const uint8_t *valid = u->valid;
    load_q(J, b, h, qpos, nr, qs);
    for (int64_t i = 0; i < nr; i++) {
        const float *di = B->dout + b * B->sd_b + h * B->sd_h + qpos[i] * B->sd_n;
        const float *oi = J->o + (base + qpos[i]) * D;
        __m256 acc = _mm256_setzero_ps();
        for (int64_t c = 0; c < D; c += 8) {
            const __m256 d8 = valid[i] ? _mm256_loadu_ps(di + c) : _mm256_setzero_ps();
            _mm256_storeu_ps(dot + i * D + c, d8);
            acc = _mm256_fmadd_ps(d8, _mm256_loadu_ps(oi + c), acc);
        }
        delta[i] = hsum(acc);
        const float l = J->lse[base + qpos[i]];
        lse[i] = l == -INFINITY ? INFINITY : l;
    }
}

static void bwd_item(const void *arg, int64_t k, void *mem, int tid) {
    const bwd_args *B = (const bwd_args *)arg;
    const fwd_args *J = &B->f;
    const int64_t D = J->D, bk = J->bk;
    const item_t u = item(J, k);
    const int64_t *t = u.t, *kid = u.kid, *qpos = u.qpos;
    const int64_t r0 = u.r0, nr = u.nr, g = u.g, b = u.b, hk = u.hk, slots = u.slots;
    float *qs = (float *)mem, *dot = qs + QT * D, *dq = dot + QT * D, *s = dq + QT * D;
    float *dp = s + QT * KC, *lse = dp + QT * KC, *delta = lse + QT;
    float *vm = delta + QT, *ones = vm + 8 * QT;
    const uint8_t *valid = u.valid;
    bwd_rows(B, &u, qs, dot, delta, lse);
    for (int64_t i = 0; i < KC; i++) ones[i] = 1.0f;
    memset(dq, 0, sizeof(float) * nr * D);
    const float *krows[KC], *qrows[QT], *drows[QT];
    for (int64_t i = 0; i < nr; i++) { qrows[i] = qs + i * D; drows[i] = dot + i * D; }
    const float *kg = B->k + b * B->sk_b + hk * B->sk_h;
    const int64_t per = KC / bk;
    for (int64_t s0 = 0; s0 < slots; s0 += per) {
        const int64_t nsl = s0 + per < slots ? per : slots - s0, w = nsl * bk;
        key_rows(J, kid + s0, nsl, kg, B->sk_n, krows);
        chunk_scores(J, t, r0, nr, s0, nsl, qs, s, vm);  /* S = (q scale) K^T + mask */
        for (int64_t q_ = 0; q_ < nsl; q_++) {  /* dP = dO V^T */
            const int64_t kb = kid[s0 + q_];
            const float *vt = B->vt + (g * J->nkb + kb) * D * bk;
            for (int64_t i = 0, M; i < nr; i += M) {
                M = tile_rows(i, nr);
                for (int64_t j = 0; j < bk; j += 16) {
                    DISPATCH(M, tile_qk(m_, dot + i * D, D, vt + j, bk, NULL, 0, 0,
                                        dp + i * KC + q_ * bk + j, KC, vm + 8 * i))
                }
            }
        }
        for (int64_t i = 0; i < nr; i++) {  /* P = exp(S - lse), dS = P (dP - delta) */
            float *si = s + i * KC, *di = dp + i * KC;
            const __m256 l8 = _mm256_set1_ps(lse[i]), d8 = _mm256_set1_ps(delta[i]);
            for (int64_t j = 0; j < w; j += 8) {
                const __m256 p = exp_ps(_mm256_loadu_ps(si + j), l8);
                _mm256_storeu_ps(si + j, p);
                _mm256_storeu_ps(di + j, _mm256_mul_ps(p, _mm256_sub_ps(_mm256_loadu_ps(di + j),
                                                                         d8)));
            }
        }
        for (int64_t i = 0, M; i < nr; i += M) {  /* dQ += dS K */
            M = tile_rows(i, nr);
            for (int64_t c = 0; c < D; c += 16) {
                DISPATCH(M, tile_pv(m_, dp + i * KC, KC, 1, krows, w, D, c, ones, dq + i * D))
            }
        }
        const int64_t blk = bk * D, part = B->G * J->nkb * blk;
        float *acc = B->acc + ((int64_t)tid * 2 * B->G + g) * J->nkb * blk;
        for (int64_t q_ = 0; q_ < nsl; q_++) {  /* dK += dS^T (q scale); dV += P^T dO */
            const int64_t kb = kid[s0 + q_];
            uint8_t *fresh = B->touched + ((int64_t)tid * B->G + g) * J->nkb + kb;
            if (!*fresh) {  /* this thread's first use of the block: zero its sums */
                memset(acc + kb * blk, 0, sizeof(float) * blk);
                memset(acc + part + kb * blk, 0, sizeof(float) * blk);
                *fresh = 1;
            }
            for (int pass = 0; pass < 2; pass++) {
                const float *pt = (pass ? s : dp) + q_ * bk;
                float *out = acc + pass * part + kb * blk;
                for (int64_t i = 0, M; i < bk; i += M) {
                    M = tile_rows(i, bk);
                    for (int64_t c = 0; c < D; c += 16) {
                        DISPATCH(M, tile_pv(m_, pt + i, 1, KC, pass ? drows : qrows, nr, D,
                                            c, ones, out + i * D))
                    }
                }
            }
        }
    }
    const __m256 sc = _mm256_set1_ps(J->scale);
    for (int64_t i = 0; i < nr; i++) {
        if (!valid[i]) continue;
        float *o = B->dq + (u.base + qpos[i]) * D;
        for (int64_t c = 0; c < D; c += 8)
            _mm256_storeu_ps(o + c, _mm256_mul_ps(sc, _mm256_loadu_ps(dq + i * D + c)));
    }
}

int attndsl_flash_bwd(const bwd_args *B) {
    const fwd_args *J = &B->f;
    if (rejects(J)) return 1;
    const size_t bytes = sizeof(float) * (QT * J->D * 3 + QT * KC * 2 + 10 * QT + KC);
    parallel(J->threads, J->ntasks * subs(J), bytes, bwd_item, B);
    return 0;
}

/* out [B, HKV, N, D] at strides so_* += (with assign: =) the sum over `parts` accumulators
   [parts, G, nkb, bk, D] (at part stride ps; a part's block counts where touched[part, g, kb],
   at part stride ts) of each valid block position's row, at its key row pos. */
typedef struct {
    const float *acc;
    int64_t parts, ps;
    const uint8_t *touched;
    int64_t ts;
    const int64_t *pos;
    const uint8_t *valid;
    float *out;
    int64_t so_b, so_h, so_n;
    int64_t G, HKV, nkb, bk, D;
    int threads, assign;
} unpack_args;

static void unpack_item(const void *arg, int64_t k, void *mem, int tid) {
    const unpack_args *U = (const unpack_args *)arg;
    (void)mem;
    (void)tid;
    const int64_t g = k / U->nkb, kb = k % U->nkb, bk = U->bk, D = U->D;
    float *out = U->out + (g / U->HKV) * U->so_b + (g % U->HKV) * U->so_h;
    for (int64_t j = 0; j < bk; j++) {
        if (!U->valid[kb * bk + j]) continue;
        float *o = out + U->pos[kb * bk + j] * U->so_n;
        int first = U->assign;
        for (int64_t p = 0; p < U->parts; p++) {
            if (!U->touched[p * U->ts + k]) continue;
            const float *a = U->acc + p * U->ps + (k * bk + j) * D;
            if (first) {
                for (int64_t c = 0; c < D; c++) o[c] = a[c];
                first = 0;
            } else {
                for (int64_t c = 0; c < D; c++) o[c] += a[c];
            }
        }
        if (first) memset(o, 0, sizeof(float) * D);  /* no task reached the block */
    }
}

int attndsl_unpack(const unpack_args *U) {
    if (U->threads < 1) return 1;
    parallel(U->threads, U->G * U->nkb, 0, unpack_item, U);
    return 0;
}

/* out[c, 0:8] (row stride so) = rows[0:8][c] for c < 8: one 8 x 8 transpose. */
static inline void transpose8(const float *const *rows, float *out, int64_t so) {
    __m256 r[8], t[8];
    for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(rows[i]);
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++) {
        _mm256_storeu_ps(out + i * so, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
        _mm256_storeu_ps(out + (i + 4) * so, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
    }
}

static void pack_item(const void *arg, int64_t k, void *mem, int tid) {
    const pack_args *P = (const pack_args *)arg;
    (void)mem;
    (void)tid;
    const int64_t g = k / P->nkb, kb = k % P->nkb, bk = P->bk, D = P->D;
    const float *x = P->x + (g / P->HKV) * P->sx_b + (g % P->HKV) * P->sx_h;
    const int64_t *pos = P->pos + kb * bk;
    float *out = P->out + k * bk * D;
    for (int64_t j = 0; j < bk; j += 8) {  /* out[d, j] = x's row pos[j], column d */
        const float *rows[8];
        for (int i = 0; i < 8; i++) rows[i] = x + pos[j + i] * P->sx_n;
        for (int64_t d = 0; d < D; d += 8) {
            const float *cols[8];
            for (int i = 0; i < 8; i++) cols[i] = rows[i] + d;
            transpose8(cols, out + d * bk + j, bk);
        }
    }
}

/* Copies x's key rows into blocks, transposed: [G, nkb, D, bk] (D, bk multiples of 8). */
int attndsl_pack(const pack_args *P) {
    if (P->threads < 1) return 1;
    parallel(P->threads, P->G * P->nkb, 0, pack_item, P);
    return 0;
}
