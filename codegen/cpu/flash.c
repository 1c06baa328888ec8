/* backend="cpu": the block-sparse forward and backward, in AVX2 + FMA (fp32).

   Compiled on first use by native.py with the machine's C compiler; without a compiler or
   AVX2 the backend keeps ATen's kernel (fused.py). One call runs a whole task list: a task
   is one (batch-and-kv-head pair g, query block qb, query head r) with its key blocks, read
   in place through their indices (no gather, no packing). Per sub-tile of at most QT query
   rows it streams the key blocks in chunks of at most KC keys. Scores are kept keys-major,
   S^T = K (q scale)^T, from the sub-tile's q transposed once (D x QT, in L1) against the
   key rows where they lie, in a 6-key x 16-query register tile: the key side needs no
   transposed copy of k a call (a tensor of k's size, and of v's for the backward; the
   forward runs at the speed it had with the copy, whose pass cost what the in-place reads
   now do), and each query's running max, sum and rescale are plain vector lanes. Then
   O = O alpha + P V in a 6 x 16 register tile, reading P^T in place, so scores never leave
   the L1/L2 caches. The backward (bwd_item) recomputes P^T from the forward's lse over the
   same tasks, and dP^T = V dO^T the same way.

   Layouts (fp32): q [B, H, Nq, D] and the output o, lse [B, H, Nq(, D)] in the caller's
   token order, the rows of query block qb at qpos[qb bq ..] (written where qvalid; rows
   without a key get o = 0 and lse = -inf); k, v [B, HKV, Nk, D] read in place: position j
   of key block kb of pair g (b = g / HKV, hk = g % HKV) is the row kpos[kb bk + j] of
   (b, hk). tasks [T, 8] int64: g, qb, r (query head hk R + r), the address of the
   key-block ids, their number (slots), the address of the mask (0: none; keys-major
   [slots bk, mw]: key j's entries for the block's queries at j mw, mw >= bq a multiple of
   16; additive floats, or with `bits` one bit an entry, 1 where attended), mw, and the
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
    const float *k, *v;
    int64_t sk_b, sk_h, sk_n, sv_b, sv_h, sv_n;
    const int64_t *kpos;  /* [nkb bk] */
    const int64_t *tasks;
    int64_t ntasks, H, HKV, R, nqb, bq, D, nkb, bk;
    float scale;
    int threads;
    int bits;  /* the masks are bits (1: attended), not additive floats */
} fwd_args;

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

/* c[i] += a[i][d] (b0, b1): rows i < M <= 6, each at its own address. */
static inline __attribute__((always_inline)) void fma_ptrs(
        int M, const float *const *a, int64_t d, __m256 b0, __m256 b1, __m256 c[6][2]) {
    for (int i = 0; i < 6; i++) {
        if (i < M) {
            const __m256 x = _mm256_broadcast_ss(a[i] + d);
            c[i][0] = _mm256_fmadd_ps(x, b0, c[i][0]);
            c[i][1] = _mm256_fmadd_ps(x, b1, c[i][1]);
        }
    }
}

/* st[i, 0:16] (row stride ss, 64-byte aligned) = sum_d k_i[d] xt[d, 0:16] (row stride sx,
   aligned) for key rows k_i, i < M <= 6, and 16 queries, each row masked by its own mask
   row mk[i] (mk NULL or an entry NULL: unmasked): with bits, -inf where bit c of the 16 at
   mk[i] is 0; else + the floats mk[i][0:16]. vm[0:16] (NULL: none) takes the max over the
   keys. */
static inline __attribute__((always_inline)) void tile_kq_rows(
        int M, const float *const *k, int64_t D, const float *xt, int64_t sx,
        const void *const *mk, int bits, float *st, int64_t ss, float *vm) {
    __m256 c[6][2];
    for (int i = 0; i < 6; i++) c[i][0] = c[i][1] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d++)
        fma_ptrs(M, k, d, _mm256_load_ps(xt + d * sx), _mm256_load_ps(xt + d * sx + 8), c);
    const __m256 ninf = _mm256_set1_ps(-INFINITY);
    __m256 m0 = ninf, m1 = ninf;
    for (int i = 0; i < 6; i++) {
        if (i < M) {
            if (mk && mk[i] && bits) {
                const __m256i lo = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
                const __m256i hi = _mm256_slli_epi32(lo, 8);
                uint16_t w16;
                memcpy(&w16, mk[i], 2);
                const __m256i x = _mm256_set1_epi32(w16);
                __m256 on0 = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(x, lo), lo));
                __m256 on1 = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(x, hi), hi));
                c[i][0] = _mm256_blendv_ps(ninf, c[i][0], on0);
                c[i][1] = _mm256_blendv_ps(ninf, c[i][1], on1);
            } else if (mk && mk[i]) {
                const float *f = (const float *)mk[i];
                c[i][0] = _mm256_add_ps(c[i][0], _mm256_loadu_ps(f));
                c[i][1] = _mm256_add_ps(c[i][1], _mm256_loadu_ps(f + 8));
            }
            _mm256_store_ps(st + i * ss, c[i][0]);
            _mm256_store_ps(st + i * ss + 8, c[i][1]);
            m0 = _mm256_max_ps(m0, c[i][0]);
            m1 = _mm256_max_ps(m1, c[i][1]);
        }
    }
    if (vm) {
        _mm256_store_ps(vm, _mm256_max_ps(m0, _mm256_load_ps(vm)));
        _mm256_store_ps(vm + 8, _mm256_max_ps(m1, _mm256_load_ps(vm + 8)));
    }
}

/* tile_kq_rows with the mask rows at mk + i sm (in bytes with bits, else in floats; mk
   NULL: none). */
static inline __attribute__((always_inline)) void tile_kq(
        int M, const float *const *k, int64_t D, const float *xt, int64_t sx, const void *mk,
        int64_t sm, int bits, float *st, int64_t ss, float *vm) {
    const void *rows[6];
    for (int i = 0; i < 6; i++)
        rows[i] = bits ? (const void *)((const uint8_t *)mk + i * sm)
                       : (const void *)((const float *)mk + i * sm);
    tile_kq_rows(M, k, D, xt, sx, mk ? rows : NULL, bits, st, ss, vm);
}

/* out[i][c0:c0 + 16] = out[i][c0:c0 + 16] al[i] + sum_j p[i sp + j sj] x_j[c0:c0 + 16],
   j < n, rows i < M, each output row at its own address; x_j at rows[j] (the rows of v, k,
   q or dO where they lie). sj = 1 reads p row by row; sp = 1 reads it transposed (dS^T,
   P^T). al NULL: out is written, not read (a forward item's first chunk). */
static inline __attribute__((always_inline)) void tile_pv_to(
        int M, const float *p, int64_t sp, int64_t sj, const float *const *rows, int64_t n,
        int64_t c0, const float *al, float *const *out) {
    __m256 c[6][2];
    for (int i = 0; i < 6; i++) {
        if (i < M) {
            if (!al) {
                c[i][0] = c[i][1] = _mm256_setzero_ps();
                continue;
            }
            __m256 a = _mm256_broadcast_ss(al + i);
            c[i][0] = _mm256_mul_ps(a, _mm256_loadu_ps(out[i] + c0));
            c[i][1] = _mm256_mul_ps(a, _mm256_loadu_ps(out[i] + c0 + 8));
        }
    }
    for (int64_t j = 0; j < n; j++) {
        const float *x = rows[j] + c0;
        fma_rows(M, p + j * sj, sp, _mm256_loadu_ps(x), _mm256_loadu_ps(x + 8), c);
    }
    for (int i = 0; i < 6; i++) {
        if (i < M) {
            _mm256_storeu_ps(out[i] + c0, c[i][0]);
            _mm256_storeu_ps(out[i] + c0 + 8, c[i][1]);
        }
    }
}

/* tile_pv_to for the rows o + i D (row stride D). */
static inline __attribute__((always_inline)) void tile_pv(
        int M, const float *p, int64_t sp, int64_t sj, const float *const *rows, int64_t n,
        int64_t D, int64_t c0, const float *al, float *o) {
    float *out[6];
    for (int i = 0; i < 6; i++) out[i] = o + i * D;
    tile_pv_to(M, p, sp, sj, rows, n, c0, al, out);
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

/* kr[slot bk + j], vr[slot bk + j] = k's and v's rows of position j of key block
   kid[slot], slots < nsl (kg, vg: the pair's rows, at row strides sk, sv). */
static inline void key_rows(const fwd_args *J, const int64_t *kid, int64_t nsl,
                            const float *kg, const float *vg, const float **kr,
                            const float **vr) {
    const int64_t bk = J->bk;
    for (int64_t s = 0; s < nsl; s++) {
        const int64_t *pos = J->kpos + kid[s] * bk;
        for (int64_t j = 0; j < bk; j++) {
            kr[s * bk + j] = kg + pos[j] * J->sk_n;
            vr[s * bk + j] = vg + pos[j] * J->sv_n;
        }
    }
}

/* Calls that write at least STREAM bytes of output rows store them around the caches
   (non-temporal: a line is not read before it is written, and k, v stay cached): with
   q, k, v and o together far larger than the L2s, a row written now is gone before anyone
   reads it. 5-9% faster forwards on dilated na2d (rows scattered by the dilation); no
   change measurable on na2d and na3d (2-core EPYC). */
#define STREAM ((int64_t)8 << 20)

/* out[0:D] = x[0:D] sc (out: a row of the caller's tensor). */
static inline void put_row(float *out, const float *x, __m256 sc, int64_t D, int stream) {
    if (stream && !((uintptr_t)out & 31)) {
        for (int64_t c = 0; c < D; c += 8)
            _mm256_stream_ps(out + c, _mm256_mul_ps(sc, _mm256_load_ps(x + c)));
    } else {
        for (int64_t c = 0; c < D; c += 8)
            _mm256_storeu_ps(out + c, _mm256_mul_ps(sc, _mm256_load_ps(x + c)));
    }
}

/* One work item of a call: rows r0 .. r0 + nr - 1 (nr <= QT) of a task, decoded; np: nr
   rounded up to 16 (the register tile's queries; the rest are zeros, never written). */
typedef struct {
    const int64_t *t, *kid, *qpos;  /* the task, its key-block ids, its rows' q rows */
    const uint8_t *valid;  /* 1 where a row is a real query (not padding of the last block) */
    int64_t r0, nr, np, g, b, hk, h, slots, base;  /* base: (b, h)'s first row of o, lse, dq */
} item_t;

/* Items a task is cut into. */
static inline int64_t subs(const fwd_args *J) { return (J->bq + QT - 1) / QT; }

/* Item k: sub-tile k % subs of task k / subs. */
static item_t item(const fwd_args *J, int64_t k) {
    item_t u;
    u.t = J->tasks + (k / subs(J)) * TASK;
    u.r0 = (k % subs(J)) * QT;
    u.nr = J->bq - u.r0 < QT ? J->bq - u.r0 : QT;
    u.np = (u.nr + 15) / 16 * 16;
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

/* Whether a call's output rows go around the caches (STREAM). */
static inline int streams(const fwd_args *J) { return J->ntasks * J->bq * J->D * 4 >= STREAM; }

/* Prefetches (into L2) the rows at pos[0:n] of x (row stride sn, D floats each): the next
   item's, which this thread most likely runs next (runs of consecutive items a thread). */
static inline void prefetch_rows(const float *x, const int64_t *pos, int64_t n, int64_t sn,
                                 int64_t D) {
    for (int64_t i = 0; i < n; i++)
        for (int64_t d = 0; d < D; d += 16)
            _mm_prefetch((const char *)(x + pos[i] * sn + d), _MM_HINT_T1);
}

/* Whether flash.c refuses these arguments: D % 16 == 0, bk % 16 == 0, bk <= KC needed. */
static int rejects(const fwd_args *J) {
    return J->D % 16 || J->bk % 16 || J->bk > KC || J->D > 1024 || J->threads < 1;
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

/* xt[d, i] (row stride QT) = rows[i][d] times sc for i < nr, 0 for nr <= i < np, d < D
   (a multiple of 8): 8 x 8 transposes. */
static void transpose_rows(const float *const *rows, int64_t nr, int64_t np, int64_t D,
                           float sc, float *xt) {
    const int64_t n8 = nr / 8 * 8;
    for (int64_t i = 0; i < n8; i += 8) {
        for (int64_t d = 0; d < D; d += 8) {
            const float *cols[8];
            for (int r = 0; r < 8; r++) cols[r] = rows[i + r] + d;
            transpose8(cols, xt + d * QT + i, QT);
        }
    }
    for (int64_t i = n8; i < nr; i++)
        for (int64_t d = 0; d < D; d++) xt[d * QT + i] = rows[i][d];
    for (int64_t i = nr; i < np; i++)
        for (int64_t d = 0; d < D; d++) xt[d * QT + i] = 0.0f;
    if (sc == 1.0f) return;
    const __m256 s8 = _mm256_set1_ps(sc);
    for (int64_t d = 0; d < D; d++)
        for (int64_t i = 0; i < np; i += 8)
            _mm256_store_ps(xt + d * QT + i, _mm256_mul_ps(s8, _mm256_load_ps(xt + d * QT + i)));
}

/* st[slot bk + j, i] (row stride QT) = k_j . qt[:, i] + mask for a chunk's key blocks
   (slots s0 .. s0 + nsl - 1 of item u, key rows kr) and its np queries; vm[i] (NULL: none)
   takes each query's max. */
static void chunk_scores(const fwd_args *J, const item_t *u, int64_t s0, int64_t nsl,
                         const float *const *kr, const float *qt, float *st, float *vm) {
    const int64_t D = J->D, bk = J->bk, mw = u->t[6], np = u->np;
    const void *mask = (const void *)(intptr_t)u->t[5];
    const uint8_t *part = (const uint8_t *)(intptr_t)u->t[7];
    const int64_t sm = J->bits ? mw / 8 : mw;
    for (int64_t q_ = 0; q_ < nsl; q_++) {
        const int64_t slot = s0 + q_;
        const int masked = mask && !(part && !part[slot]);
        for (int64_t j = 0, M; j < bk; j += M) {
            M = tile_rows(j, bk);
            const int64_t key = q_ * bk + j;
            for (int64_t i0 = 0; i0 < np; i0 += 16) {
                const void *mk = NULL;
                if (masked) {  /* entry (key slot bk + j, query r0 + i0) */
                    const int64_t at = (slot * bk + j) * mw + u->r0 + i0;
                    mk = J->bits ? (const void *)((const uint8_t *)mask + at / 8)
                                 : (const void *)((const float *)mask + at);
                }
                DISPATCH(M, tile_kq(m_, kr + key, D, qt + i0, QT, mk, sm, J->bits,
                                    st + key * QT + i0, QT, vm ? vm + i0 : NULL))
            }
        }
    }
}

/* The keys of a chunk (slots s0 .. s0 + nsl - 1 of item u) that some query of the item
   attends, for an item of at most 16 queries with bit masks: mks[0:n] their mask rows (NULL:
   unmasked) and at[0:n] their places in the chunk; returns n, or -1 (the chunk is computed
   whole) where fewer than one key in COMPACT is dead. The one place that decides which keys
   the kernels compute (fwd_item and bwd_item run it, attndsl_flash_count counts it). A dead
   key's probabilities and dS are exactly 0, so leaving it out changes no bit of the outputs
   or gradients; the dilated na2d computes 29% dead keys (15-19% faster forward, 11% forward
   + backward), na2d 4% (no gain: hence the bar). */
#define COMPACT 8
static int64_t live_keys(const fwd_args *J, const item_t *u, int64_t s0, int64_t nsl,
                         const void **mks, int16_t *at) {
    const uint8_t *mask = (const uint8_t *)(intptr_t)u->t[5];
    const uint8_t *part = (const uint8_t *)(intptr_t)u->t[7];
    const int64_t mw = u->t[6], bk = J->bk, w = nsl * bk;
    if (u->np != 16 || !J->bits || !mask) return -1;
    int64_t n = 0;
    for (int64_t q_ = 0; q_ < nsl; q_++) {
        const int64_t slot = s0 + q_;
        const int masked = !(part && !part[slot]);
        for (int64_t j = 0; j < bk; j++) {
            const uint8_t *mk = NULL;
            if (masked) {
                uint16_t w16;
                mk = mask + ((slot * bk + j) * mw + u->r0) / 8;
                memcpy(&w16, mk, 2);
                if (!w16) continue;
            }
            mks[n] = mk;
            at[n++] = (int16_t)(q_ * bk + j);
        }
    }
    return (w - n) * COMPACT < w ? -1 : n;
}

/* A chunk's scores into st (and their max into vm, unless NULL): over its live keys
   (live_keys), moved to the front of kr and vr, returning their number; else over all its
   keys (chunk_scores), returning -1. The forward and the backward score chunks alike. */
static int64_t live_scores(const fwd_args *J, const item_t *u, int64_t s0, int64_t nsl,
                           const float **kr, const float **vr, const float *qt, float *st,
                           float *vm, const void **mks, int16_t *at) {
    const int64_t n = live_keys(J, u, s0, nsl, mks, at);
    if (n < 0) {
        chunk_scores(J, u, s0, nsl, kr, qt, st, vm);
        return -1;
    }
    for (int64_t j = 0; j < n; j++) {  /* at[j] >= j: every move is forwards-safe */
        kr[j] = kr[at[j]];
        vr[j] = vr[at[j]];
    }
    for (int64_t j = 0, M; j < n; j += M) {
        M = tile_rows(j, n);
        DISPATCH(M, tile_kq_rows(m_, kr + j, J->D, qt, QT, mks + j, 1, st + j * QT, QT, vm))
    }
    return n;
}

/* The scratch of a forward item (floats; every part 64-byte aligned). */
static size_t fwd_scratch(int64_t D) { return sizeof(float) * (2 * QT * D + KC * QT + 4 * QT); }

/* One item's rows against all its task's key blocks. */
static void fwd_item(const void *arg, int64_t k, void *mem, int tid) {
    (void)tid;
    const fwd_args *J = (const fwd_args *)arg;
    const item_t u = item(J, k);
    const int64_t D = J->D, bk = J->bk, nr = u.nr, np = u.np, slots = u.slots;
    float *qt = (float *)mem, *o = qt + QT * D, *st = o + QT * D, *m = st + KC * QT;
    float *l = m + QT, *al = l + QT, *vm = al + QT;
    const float *rows[QT], *kr[KC], *vr[KC];
    const void *mks[KC];
    int16_t at[KC];
    const float *qg = J->q + u.b * J->sq_b + u.h * J->sq_h;
    for (int64_t i = 0; i < nr; i++) rows[i] = qg + u.qpos[i] * J->sq_n;
    transpose_rows(rows, nr, np, D, J->scale, qt);
    if (k + 1 < J->ntasks * subs(J)) {
        /* the next item's query rows, and the k and v rows of its key blocks this item
           does not read, into L2: dilated rows defeat the hardware's prefetcher. In-process
           A/B against the query rows alone (with the first chunk writing o unread, below):
           dilated na2d forward 8-11% faster, na2d 6%, na3d and 1D within noise. */
        const item_t n1 = item(J, k + 1);
        prefetch_rows(J->q + n1.b * J->sq_b + n1.h * J->sq_h, n1.qpos, n1.nr, J->sq_n, D);
        if (n1.t != u.t) {  /* else the same task's next rows: the same key blocks */
            const float *kg1 = J->k + n1.b * J->sk_b + n1.hk * J->sk_h;
            const float *vg1 = J->v + n1.b * J->sv_b + n1.hk * J->sv_h;
            for (int64_t s = 0; s < n1.slots; s++) {
                int have = 0;
                if (n1.g == u.g)
                    for (int64_t s2 = 0; s2 < u.slots; s2++) have |= u.kid[s2] == n1.kid[s];
                if (have) continue;
                const int64_t *pos = J->kpos + n1.kid[s] * J->bk;
                prefetch_rows(kg1, pos, J->bk, J->sk_n, D);
                prefetch_rows(vg1, pos, J->bk, J->sv_n, D);
            }
        }
    }
    if (!slots) memset(o, 0, sizeof(float) * nr * D);  /* else the first chunk writes o */
    for (int64_t i = 0; i < np; i++) { m[i] = -INFINITY; l[i] = 0.0f; }
    const float *kg = J->k + u.b * J->sk_b + u.hk * J->sk_h;
    const float *vg = J->v + u.b * J->sv_b + u.hk * J->sv_h;
    const int64_t per = KC / bk;  /* key blocks per chunk */
    const __m256 ninf = _mm256_set1_ps(-INFINITY), zero = _mm256_setzero_ps();
    for (int64_t s0 = 0; s0 < slots; s0 += per) {
        const int64_t nsl = s0 + per < slots ? per : slots - s0, w = nsl * bk;
        for (int64_t i = 0; i < np; i += 8) _mm256_store_ps(vm + i, ninf);
        key_rows(J, u.kid + s0, nsl, kg, vg, kr, vr);
        const int64_t live = live_scores(J, &u, s0, nsl, kr, vr, qt, st, vm, mks, at);
        const int64_t wl = live < 0 ? w : live;  /* the keys the chunk computes */
        for (int64_t i = 0; i < np; i += 8) {  /* 8 queries' online softmax, lane by lane */
            const __m256 mold = _mm256_load_ps(m + i);
            const __m256 mnew = _mm256_max_ps(mold, _mm256_load_ps(vm + i));
            /* no key yet (max -inf): exp against 0 gives P = 0 and alpha = 0, o stays 0 */
            const __m256 mb = _mm256_blendv_ps(mnew, zero, _mm256_cmp_ps(mnew, ninf, _CMP_EQ_OQ));
            __m256 acc = zero;
            for (int64_t j = 0; j < wl; j++) {
                const __m256 e = exp_ps(_mm256_load_ps(st + j * QT + i), mb);
                _mm256_store_ps(st + j * QT + i, e);
                acc = _mm256_add_ps(acc, e);
            }
            const __m256 a8 = exp_ps(mold, mb);
            _mm256_store_ps(al + i, a8);
            _mm256_store_ps(l + i, _mm256_fmadd_ps(_mm256_load_ps(l + i), a8, acc));
            _mm256_store_ps(m + i, mnew);
        }
        for (int64_t i = 0, M; i < nr; i += M) {  /* O = O alpha + P V, P^T read in place */
            M = tile_rows(i, nr);
            for (int64_t c = 0; c < D; c += 16) {
                DISPATCH(M, tile_pv(m_, st + i, 1, QT, vr, wl, D, c, s0 ? al + i : NULL,
                                    o + i * D))
            }
        }
    }
    const int stream = streams(J);
    for (int64_t i = 0; i < nr; i++) {
        if (!u.valid[i]) continue;  /* a padding position of the last block */
        const float li = l[i];
        const int64_t row = u.base + u.qpos[i];
        put_row(J->o + row * D, o + i * D, _mm256_set1_ps(li > 0.0f ? 1.0f / li : 0.0f), D,
                stream);
        J->lse[row] = li > 0.0f ? m[i] + logf(li) : -INFINITY;
    }
    if (stream) _mm_sfence();
}

/* Runs every task (each cut into items of QT query rows); 1 when it rejects its
   arguments (rejects), else 0. */
int attndsl_flash_fwd(const fwd_args *J) {
    if (rejects(J)) return 1;
    parallel(J->threads, J->ntasks * subs(J), fwd_scratch(J->D), fwd_item, J);
    return 0;
}

/* *out += the elements (query rows x keys) the forward (and the backward) computes for
   these tasks: per chunk, its live keys where live_keys compacts it, else all its keys.
   Reads the tasks and masks only (no q, k, v); 1 when it rejects its arguments, else 0. */
int attndsl_flash_count(const fwd_args *J, int64_t *out) {
    if (J->bk % 16 || J->bk > KC) return 1;
    const void *mks[KC];
    int16_t at[KC];
    const int64_t per = KC / J->bk;
    int64_t sum = 0;
    for (int64_t k = 0; k < J->ntasks * subs(J); k++) {
        const item_t u = item(J, k);
        for (int64_t s0 = 0; s0 < u.slots; s0 += per) {
            const int64_t nsl = s0 + per < u.slots ? per : u.slots - s0;
            const int64_t live = live_keys(J, &u, s0, nsl, mks, at);
            sum += u.nr * (live < 0 ? nsl * J->bk : live);
        }
    }
    *out += sum;
    return 0;
}

/* The backward of a forward's tasks: per task sub-tile, the probabilities recomputed from
   the forward's lse, P^T = exp(S^T - lse), dP^T = V dO^T, dS^T = P^T (dP^T - delta) with
   delta = rowsum(dO O); dQ = scale dS K written to the task's rows, and dK += dS^T (q scale),
   dV += P^T dO added into this thread's own accumulators (acc[thread] = [2, G, nkb, bk, D]:
   dk, dv; a block's zeroed on the thread's first use, marked in touched), which
   attndsl_unpack sums afterwards, so tasks never race. */
typedef struct {
    fwd_args f;  /* q, k, v, o (the forward's output), lse, tasks ... as the forward had them */
    const float *dout;  /* [B, H, Nq, D] at strides sd_* */
    int64_t sd_b, sd_h, sd_n;
    float *dq;  /* [B, H, Nq, D] */
    float *acc;  /* [threads, 2, G, nkb, bk, D], zeroed per block on first use */
    uint8_t *touched;  /* [threads, G, nkb], 0: 1 where the thread's block is in use */
    int64_t G;
} bwd_args;

/* The scratch of a backward item (floats; every part 64-byte aligned). */
static size_t bwd_scratch(int64_t D) {
    return sizeof(float) * (5 * QT * D + 2 * KC * QT + 2 * QT + KC);
}

static void bwd_item(const void *arg, int64_t k, void *mem, int tid) {
    const bwd_args *B = (const bwd_args *)arg;
    const fwd_args *J = &B->f;
    const int64_t D = J->D, bk = J->bk;
    const item_t u = item(J, k);
    const int64_t *kid = u.kid, *qpos = u.qpos;
    const int64_t nr = u.nr, np = u.np, g = u.g, slots = u.slots;
    float *qs = (float *)mem, *dot = qs + QT * D, *qt = dot + QT * D, *dt = qt + QT * D;
    float *dq = dt + QT * D, *s = dq + QT * D, *dp = s + KC * QT, *lse = dp + KC * QT;
    float *delta = lse + QT, *ones = delta + QT;
    const uint8_t *valid = u.valid;
    /* qs = q scale, dot = dO (0 at padding positions, which then add nothing to dk and
       dv), their transposes, delta and lse (+inf without a key and past nr: P = 0) */
    const float *qg = J->q + u.b * J->sq_b + u.h * J->sq_h;
    const float *dg = B->dout + u.b * B->sd_b + u.h * B->sd_h;
    const float *qrows[QT], *drows[QT], *krows[KC], *vrows[KC];
    const void *mks[KC];
    int16_t at[KC];
    float *outs[KC];
    const __m256 sc = _mm256_set1_ps(J->scale);
    for (int64_t i = 0; i < nr; i++) {
        const float *qi = qg + qpos[i] * J->sq_n, *di = dg + qpos[i] * B->sd_n;
        const float *oi = J->o + (u.base + qpos[i]) * D;
        __m256 acc = _mm256_setzero_ps();
        for (int64_t c = 0; c < D; c += 8) {
            _mm256_store_ps(qs + i * D + c, _mm256_mul_ps(sc, _mm256_loadu_ps(qi + c)));
            const __m256 d8 = valid[i] ? _mm256_loadu_ps(di + c) : _mm256_setzero_ps();
            _mm256_store_ps(dot + i * D + c, d8);
            acc = _mm256_fmadd_ps(d8, _mm256_loadu_ps(oi + c), acc);
        }
        delta[i] = hsum(acc);
        const float li = J->lse[u.base + qpos[i]];
        lse[i] = li == -INFINITY ? INFINITY : li;
        qrows[i] = qs + i * D;
        drows[i] = dot + i * D;
    }
    for (int64_t i = nr; i < np; i++) { lse[i] = INFINITY; delta[i] = 0.0f; }
    transpose_rows(qrows, nr, np, D, 1.0f, qt);
    transpose_rows(drows, nr, np, D, 1.0f, dt);
    if (k + 1 < J->ntasks * subs(J)) {  /* the next item's q, dO and o rows */
        const item_t n1 = item(J, k + 1);
        prefetch_rows(J->q + n1.b * J->sq_b + n1.h * J->sq_h, n1.qpos, n1.nr, J->sq_n, D);
        prefetch_rows(B->dout + n1.b * B->sd_b + n1.h * B->sd_h, n1.qpos, n1.nr, B->sd_n, D);
        prefetch_rows(J->o + n1.base, n1.qpos, n1.nr, D, D);
    }
    for (int64_t i = 0; i < KC; i++) ones[i] = 1.0f;
    memset(dq, 0, sizeof(float) * nr * D);
    const float *kg = J->k + u.b * J->sk_b + u.hk * J->sk_h;
    const float *vg = J->v + u.b * J->sv_b + u.hk * J->sv_h;
    const int64_t per = KC / bk;
    for (int64_t s0 = 0; s0 < slots; s0 += per) {
        const int64_t nsl = s0 + per < slots ? per : slots - s0, w = nsl * bk;
        key_rows(J, kid + s0, nsl, kg, vg, krows, vrows);
        /* S^T = K (q scale)^T + mask, over the chunk's live keys (live_keys, as the forward
           computed them; a dead key's P and dS are exactly 0) or all of them */
        const int64_t live = live_scores(J, &u, s0, nsl, krows, vrows, qt, s, NULL, mks, at);
        const int64_t wl = live < 0 ? w : live;
        for (int64_t j = 0, M; j < wl; j += M) {  /* dP^T = V dO^T */
            M = live < 0 ? tile_rows(j % bk, bk) : tile_rows(j, wl);
            for (int64_t i0 = 0; i0 < np; i0 += 16) {
                DISPATCH(M, tile_kq(m_, vrows + j, D, dt + i0, QT, NULL, 0, 0,
                                    dp + j * QT + i0, QT, NULL))
            }
        }
        for (int64_t i = 0; i < np; i += 8) {  /* P^T = exp(S^T - lse), dS^T = P^T (dP^T - delta) */
            const __m256 l8 = _mm256_load_ps(lse + i), d8 = _mm256_load_ps(delta + i);
            for (int64_t j = 0; j < wl; j++) {
                const __m256 p = exp_ps(_mm256_load_ps(s + j * QT + i), l8);
                _mm256_store_ps(s + j * QT + i, p);
                _mm256_store_ps(dp + j * QT + i,
                                _mm256_mul_ps(p, _mm256_sub_ps(_mm256_load_ps(dp + j * QT + i), d8)));
            }
        }
        for (int64_t i = 0, M; i < nr; i += M) {  /* dQ += dS K */
            M = tile_rows(i, nr);
            for (int64_t c = 0; c < D; c += 16) {
                DISPATCH(M, tile_pv(m_, dp + i, 1, QT, krows, wl, D, c, ones, dq + i * D))
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
            if (live >= 0) continue;  /* below: the live keys' rows, wherever they lie */
            for (int pass = 0; pass < 2; pass++) {
                const float *pt = (pass ? s : dp) + q_ * bk * QT;
                float *out = acc + pass * part + kb * blk;
                for (int64_t i = 0, M; i < bk; i += M) {
                    M = tile_rows(i, bk);
                    for (int64_t c = 0; c < D; c += 16) {
                        DISPATCH(M, tile_pv(m_, pt + i * QT, QT, 1, pass ? drows : qrows, nr,
                                            D, c, ones, out + i * D))
                    }
                }
            }
        }
        for (int pass = 0; live >= 0 && pass < 2; pass++) {
            for (int64_t j = 0; j < live; j++)
                outs[j] = acc + pass * part + kid[s0 + at[j] / bk] * blk + (at[j] % bk) * D;
            for (int64_t i = 0, M; i < live; i += M) {
                M = tile_rows(i, live);
                for (int64_t c = 0; c < D; c += 16) {
                    DISPATCH(M, tile_pv_to(m_, (pass ? s : dp) + i * QT, QT, 1,
                                           pass ? drows : qrows, nr, c, ones, outs + i))
                }
            }
        }
    }
    const int stream = streams(J);
    for (int64_t i = 0; i < nr; i++)
        if (valid[i]) put_row(B->dq + (u.base + qpos[i]) * D, dq + i * D, sc, D, stream);
    if (stream) _mm_sfence();
}

int attndsl_flash_bwd(const bwd_args *B) {
    const fwd_args *J = &B->f;
    if (rejects(J)) return 1;
    parallel(J->threads, J->ntasks * subs(J), bwd_scratch(J->D), bwd_item, B);
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

