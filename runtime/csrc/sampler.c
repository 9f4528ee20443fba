/* sampler.c -- the seeded RNG and the sampler documented in llamavid.h (greedy, temperature, top-k, top-p,
 * repetition penalty). llamavid_ref/sampling.py implements the same steps in numpy; tests hold the two equal.
 *
 *   logits [V] --penalty--> l [V] --greedy?--> arg max
 *                                 \--p = exp((l - max) / T)--> Z = sum of p in id order
 *                                    --candidates by l (heap, highest first, lower id first)--> top-k, top-p
 *                                    --u * kept mass--> token
 * Only the candidates that are kept are ever sorted (a heap pops them one by one), so a peaked distribution
 * over 32,000 ids costs O(V) per token, not O(V log V). */
#include "internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

struct llamavid_sampler {
    uint32_t magic;
    llamavid_sampler_params p;
    int32_t n_vocab;
    uint64_t rng[4];
    float *work;        /* [V] penalised logits */
    double *prob;       /* [V] unnormalised probabilities */
    int32_t *heap;      /* [V] candidate ids */
    int32_t *kept;      /* [V] kept ids, in order */
    unsigned char *seen;/* [V] history ids already penalised */
};

/* ---- RNG: xoshiro256** seeded by splitmix64 ------------------------------------------------------------------ */
static uint64_t splitmix64(uint64_t *state) {
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static void rng_seed(uint64_t s[4], uint64_t seed) {
    for (int i = 0; i < 4; i++) s[i] = splitmix64(&seed);
}

static double rng_double(uint64_t s[4]) {
    uint64_t result = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return (double)(result >> 11) * 0x1.0p-53;
}

void llamavid_rng_doubles(uint64_t seed, double *out, int32_t n) {
    uint64_t s[4];
    rng_seed(s, seed);
    for (int32_t i = 0; out && i < n; i++) out[i] = rng_double(s);
}

/* ---- the sampler ----------------------------------------------------------------------------------------------- */
llamavid_sampler_params llamavid_sampler_default_params(void) {
    llamavid_sampler_params p = {0.0f, 0, 1.0f, 1.0f, 0};
    return p;
}

llamavid_error *llamavid_sampler_create(const llamavid_sampler_params *p, int32_t n_vocab, llamavid_sampler **out) {
    if (!out) return llamavid_error_new(LLAMAVID_ERR_ARGUMENT, "llamavid_sampler_create: out is NULL");
    *out = NULL;
    if (!p || n_vocab < 1 || n_vocab > (1 << 24))
        return llamavid_error_new(LLAMAVID_ERR_ARGUMENT, "llamavid_sampler_create: expected params and a vocabulary of "
                                  "1 to 2^24 ids, found %s and %d", p ? "params" : "NULL params", n_vocab);
    if (!(p->temperature == p->temperature) || p->top_k < 0 || !(p->top_p > 0) || !(p->repetition_penalty > 0) ||
        isinf(p->repetition_penalty) || isinf(p->temperature))
        return llamavid_error_new(LLAMAVID_ERR_ARGUMENT, "llamavid_sampler_create: expected finite temperature, top_k >= 0, "
                                  "top_p > 0 and repetition_penalty > 0, found %g, %d, %g, %g", p->temperature, p->top_k,
                                  p->top_p, p->repetition_penalty);
    llamavid_sampler *s = calloc(1, sizeof *s);
    size_t V = (size_t)n_vocab;
    if (s) {
        s->work = malloc(V * sizeof *s->work);
        s->prob = malloc(V * sizeof *s->prob);
        s->heap = malloc(V * sizeof *s->heap);
        s->kept = malloc(V * sizeof *s->kept);
        s->seen = calloc(V, 1);
    }
    if (!s || !s->work || !s->prob || !s->heap || !s->kept || !s->seen) {
        if (s) { s->magic = MAGIC_SAMPLER; llamavid_sampler_free(s); }
        return llamavid_error_new(LLAMAVID_ERR_MEMORY, "llamavid_sampler_create: out of memory for %d ids", n_vocab);
    }
    s->magic = MAGIC_SAMPLER;
    s->p = *p;
    s->n_vocab = n_vocab;
    rng_seed(s->rng, p->seed);
    *out = s;
    return NULL;
}

void llamavid_sampler_free(llamavid_sampler *s) {
    if (!s || s->magic != MAGIC_SAMPLER) return;
    free(s->work);
    free(s->prob);
    free(s->heap);
    free(s->kept);
    free(s->seen);
    s->magic = MAGIC_FREED;
    free(s);
}

int sampler_live(const llamavid_sampler *s) { return s && s->magic == MAGIC_SAMPLER; }

void llamavid_sampler_reset(llamavid_sampler *s, uint64_t seed) {
    if (s && s->magic == MAGIC_SAMPLER) rng_seed(s->rng, seed);
}

/* a before b: higher logit first, lower id among equals */
static int before(const float *l, int32_t a, int32_t b) { return l[a] > l[b] || (l[a] == l[b] && a < b); }

static void sift_down(int32_t *h, int32_t n, int32_t i, const float *l) {
    for (;;) {
        int32_t best = i, c1 = 2 * i + 1, c2 = c1 + 1;
        if (c1 < n && before(l, h[c1], h[best])) best = c1;
        if (c2 < n && before(l, h[c2], h[best])) best = c2;
        if (best == i) return;
        int32_t t = h[i];
        h[i] = h[best];
        h[best] = t;
        i = best;
    }
}

static int32_t heap_pop(int32_t *h, int32_t *n, const float *l) {
    int32_t top = h[0];
    h[0] = h[--*n];
    sift_down(h, *n, 0, l);
    return top;
}

static const float *penalised(llamavid_sampler *s, const float *logits, const int32_t *history, int32_t n) {
    float r = s->p.repetition_penalty;
    if (r == 1.0f || !history || n <= 0) return logits;
    memcpy(s->work, logits, (size_t)s->n_vocab * sizeof(float));
    for (int32_t i = 0; i < n; i++) {
        int32_t id = history[i];
        if (id < 0 || id >= s->n_vocab || s->seen[id]) continue;
        s->seen[id] = 1;
        float x = s->work[id];
        s->work[id] = x > 0 ? x / r : x * r;
    }
    for (int32_t i = 0; i < n; i++)
        if (history[i] >= 0 && history[i] < s->n_vocab) s->seen[history[i]] = 0;
    return s->work;
}

int32_t llamavid_sampler_sample(llamavid_sampler *s, const float *logits, const int32_t *history, int32_t n_history) {
    if (!s || s->magic != MAGIC_SAMPLER || !logits) return -1;
    const int32_t V = s->n_vocab;
    const float *l = penalised(s, logits, history, n_history);
    int32_t best = 0;
    for (int32_t i = 1; i < V; i++)
        if (l[i] > l[best]) best = i;
    if (!(s->p.temperature > 0)) return best;
    /* p_i = exp((l_i - max) / T), Z = their sum in id order */
    const double T = s->p.temperature, lmax = l[best];
    double Z = 0;
    for (int32_t i = 0; i < V; i++) {
        s->prob[i] = exp(((double)l[i] - lmax) / T);
        Z += s->prob[i];
    }
    int32_t n = V, k = s->p.top_k > 0 && s->p.top_k < V ? s->p.top_k : V, n_kept = 0;
    for (int32_t i = 0; i < V; i++) s->heap[i] = i;
    for (int32_t i = V / 2 - 1; i >= 0; i--) sift_down(s->heap, V, i, l);
    if (k < V) {                                  /* top-k: the mass is that of the k candidates, in order */
        Z = 0;
        for (int32_t i = 0; i < k; i++) {
            s->kept[i] = heap_pop(s->heap, &n, l);
            Z += s->prob[s->kept[i]];
        }
        n = 0;                                    /* the heap is done with; kept[] holds the candidates */
    }
    /* top-p: keep while the mass before a candidate is < top_p * Z; the first is always kept */
    double before_mass = 0, bound = (double)s->p.top_p * Z;
    for (int32_t i = 0; i < k; i++) {
        int32_t id = k < V ? s->kept[i] : heap_pop(s->heap, &n, l);
        if (i > 0 && !(before_mass < bound)) break;
        s->kept[n_kept++] = id;
        before_mass += s->prob[id];
    }
    double target = rng_double(s->rng) * before_mass, acc = 0;
    for (int32_t i = 0; i < n_kept; i++) {
        acc += s->prob[s->kept[i]];
        if (acc > target) return s->kept[i];
    }
    return s->kept[n_kept - 1];
}
