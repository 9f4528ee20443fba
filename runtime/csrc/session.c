/* session.c -- llamavid_session: the KV cache and the buffers of one conversation, the prompt layout, the
 * frame timeline, and the generation loop.
 *
 *   prompt ids  [bos, text..., IMAGE, text...]      pixels [F,3,S,S] (or visual rows [R,H])
 *     walk: text id  -> embedding table row ----------------------+
 *           IMAGE    -> its frames, in order: frame f's tokens ----+--> embeds [n_batch,H] --full or end--> llm
 *                       (frames encoded frame_chunk at a time:         inputs_embeds [1,T,H], mask [1,pos+T],
 *                        pixels --|vision|--> feats --|head|-->        KV (shared: bound as past and present;
 *                        frame tokens [c,n+1,H], context first)        concat: past -> present ping-pong)
 *   next: logits --sampler--> token --(before the next sample) embedding row --|llm|--> logits
 *
 * Everything is allocated in llamavid_session_create; prompt/next/generate allocate nothing.
 */
#include "internal.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct llamavid_session {
    uint32_t magic;
    llamavid_model *m;
    int32_t n_ctx, n_batch, frame_chunk;
    void *ctx[N_STAGES];           /* each stage's per-session backend context */
    float **kv;                    /* [2*layers] shared: [kv_heads, n_ctx, head_dim]; concat: [kv_heads, position, head_dim] */
    float **kv_next;               /* concat only: where the next present goes, then swapped with kv */
    int32_t position;              /* positions with complete KV entries */
    int32_t *tokens;               /* [n_ctx] the text id at each position, -1 for visual tokens */
    int64_t *ones;                 /* [n_ctx] attention mask */
    float *embeds;                 /* [n_batch, H] rows waiting for the llm */
    int32_t *row_ids;              /* [n_batch] their text ids (-1: visual) */
    int32_t n_rows;
    float *feats;                  /* [frame_chunk, N+1, Cv] */
    float *frame_tokens;           /* [frame_chunk, n+1, H] */
    int32_t chunk_start, chunk_len;/* frames whose tokens frame_tokens holds */
    float *logits;                 /* [V] */
    double *rot_cos, *rot_sin;     /* [head_dim / 2] RoPE of an eviction's shift */
    int has_logits;
    int32_t pending;               /* a sampled token not yet in the KV cache, or -1 */
    int32_t stop[16], n_stop;      /* tokens that end an answer */
    llamavid_tensor *llm_in, *llm_out, *check;   /* [2 + 2L], [1 + 2L], [1 + 2L] */
    size_t kv_bytes, buffer_bytes;
    llamavid_stats stats;
};

static llamavid_error *bad_handle(const char *fn, const llamavid_session *s) {
    return llamavid_error_new(LLAMAVID_ERR_ARGUMENT, "%s: expected a live session, found %s", fn,
                              s ? "a freed or invalid handle" : "NULL");
}
#define CHECK_SESSION(fn, s) \
    if (!(s) || (s)->magic != MAGIC_SESSION) return bad_handle(fn, s)

static void set_tensor(llamavid_tensor *t, const char *name, llamavid_dtype dtype, void *data, int32_t ndim,
                       int64_t d0, int64_t d1, int64_t d2, int64_t d3) {
    t->name = name;
    t->dtype = dtype;
    t->ndim = ndim;
    t->data = data;
    int64_t d[4] = {d0, d1, d2, d3};
    for (int32_t i = 0; i < LLAMAVID_MAX_DIMS; i++) t->shape[i] = i < ndim ? d[i] : 0;
}

static void shape_text(const llamavid_tensor *t, char *out, size_t n) {
    int k = snprintf(out, n, "%s [", llamavid_dtype_name(t->dtype));
    for (int32_t i = 0; i < t->ndim && i < LLAMAVID_MAX_DIMS && k > 0 && (size_t)k < n; i++)
        k += snprintf(out + k, n - (size_t)k, i ? ",%lld" : "%lld", (long long)t->shape[i]);
    if (k > 0 && (size_t)k < n) snprintf(out + k, n - (size_t)k, "]");
}

/* ---- running a stage: time it, name it in errors, check what the backend says it produced ---------------------- */
static llamavid_error *run_stage(llamavid_session *s, int k, llamavid_tensor *in, int32_t n_in, llamavid_tensor *out,
                                 int32_t n_out) {
    const stage *st = &s->m->stages[k];
    memcpy(s->check, out, (size_t)n_out * sizeof *out);
    double t0 = now_seconds();
    llamavid_error *e = st->backend->run(st->handle, s->ctx[k], in, n_in, out, n_out);
    s->stats.stage_seconds[k] += now_seconds() - t0;
    s->stats.calls[k]++;
    char prefix[700];
    snprintf(prefix, sizeof prefix, "stage %s (%s)", STAGE_KEYS[k], st->desc);
    if (e) return error_wrap(e, LLAMAVID_ERR_BACKEND, prefix);
    for (int32_t i = 0; i < n_out; i++) {
        const llamavid_tensor *w = &s->check[i], *o = &out[i];
        if (o->dtype == w->dtype && o->ndim == w->ndim && memcmp(o->shape, w->shape, sizeof o->shape) == 0) continue;
        char want[200], got[200];
        shape_text(w, want, sizeof want);
        shape_text(o, got, sizeof got);
        return llamavid_error_new(LLAMAVID_ERR_SHAPE, "%s: output %s: expected %s, found %s", prefix, w->name, want, got);
    }
    return NULL;
}

/* ---- the llm: T rows of embeds appended at the current position ---------------------------------------------------- */
static llamavid_error *llm_call(llamavid_session *s, int32_t T) {
    const config *c = &s->m->cfg;
    const llamavid_model_info *i = &c->info;
    const stage_spec *io = &c->io[ST_LLM];
    const int prefill = s->position == 0 && i->has_prefill, shared = i->shared_kv && !prefill;
    const int32_t P = s->position, L2 = 2 * i->layers;
    set_tensor(&s->llm_in[0], io->in[0].name, LLAMAVID_F32, s->embeds, 3, 1, T, i->hidden, 0);
    set_tensor(&s->llm_in[1], io->in[1].name, LLAMAVID_I64, s->ones, 2, 1, P + T, 0, 0);
    set_tensor(&s->llm_out[0], io->out[0].name, LLAMAVID_F32, s->logits, 3, 1, 1, i->vocab_size, 0);
    for (int32_t j = 0; j < L2; j++) {
        float *present = i->shared_kv ? s->kv[j] : s->kv_next[j];
        int64_t past_len = shared ? s->n_ctx : P, present_len = shared ? s->n_ctx : P + T;
        set_tensor(&s->llm_in[2 + j], io->in[2 + j].name, LLAMAVID_F32, s->kv[j], 4, 1, i->kv_heads, past_len, i->head_dim);
        set_tensor(&s->llm_out[1 + j], io->out[1 + j].name, LLAMAVID_F32, present, 4, 1, i->kv_heads, present_len,
                   i->head_dim);
    }
    s->has_logits = 0;
    llamavid_error *e = run_stage(s, prefill ? ST_PREFILL : ST_LLM, s->llm_in, 2 + L2, s->llm_out, 1 + L2);
    if (e) return e;
    if (prefill && i->shared_kv) {      /* present [kv_heads, T, d] -> the shared layout [kv_heads, n_ctx, d] */
        size_t row = (size_t)T * (size_t)i->head_dim;
        for (int32_t j = 0; j < L2; j++)
            for (int32_t h = i->kv_heads - 1; h > 0; h--)
                memmove(s->kv[j] + (size_t)h * (size_t)s->n_ctx * (size_t)i->head_dim, s->kv[j] + (size_t)h * row,
                        row * sizeof(float));
    }
    if (!i->shared_kv) {
        float **t = s->kv;
        s->kv = s->kv_next;
        s->kv_next = t;
    }
    memcpy(s->tokens + P, s->row_ids, (size_t)T * sizeof(int32_t));
    s->position += T;
    s->has_logits = 1;
    return NULL;
}

static llamavid_error *flush(llamavid_session *s) {
    if (!s->n_rows) return NULL;
    llamavid_error *e = llm_call(s, s->n_rows);
    s->n_rows = 0;
    return e;
}

static llamavid_error *push_row(llamavid_session *s, const float *row, int32_t id) {
    const int32_t H = s->m->cfg.info.hidden;
    memcpy(s->embeds + (size_t)s->n_rows * (size_t)H, row, (size_t)H * sizeof(float));
    s->row_ids[s->n_rows++] = id;
    return s->n_rows == s->n_batch ? flush(s) : NULL;
}

static llamavid_error *push_text(llamavid_session *s, int32_t id) {
    return push_row(s, s->m->embed.rows + (size_t)id * (size_t)s->m->cfg.info.hidden, id);
}

/* ---- the frame timeline: frames --|vision|--> feats --|head|--> frame tokens, a chunk at a time ---------------------- */
llamavid_error *session_encode(llamavid_session *s, const float *pixels, int32_t n, const int64_t *qids,
                               const int64_t *qmask, int32_t L, int run_vision) {
    const config *c = &s->m->cfg;
    const llamavid_model_info *i = &c->info;
    const int32_t S = i->image_size;
    llamavid_tensor in[3], out[1];
    llamavid_error *e;
    s->chunk_len = 0;
    if (run_vision) {
        set_tensor(&in[0], c->io[ST_VISION].in[0].name, LLAMAVID_F32, (void *)pixels, 4, n, 3, S, S);
        set_tensor(&out[0], c->io[ST_VISION].out[0].name, LLAMAVID_F32, s->feats, 3, n, i->vision_tokens,
                   i->vision_width, 0);
        if ((e = run_stage(s, ST_VISION, in, 1, out, 1))) return e;
    }
    set_tensor(&in[0], c->io[ST_HEAD].in[0].name, LLAMAVID_F32, s->feats, 3, n, i->vision_tokens, i->vision_width, 0);
    set_tensor(&in[1], c->io[ST_HEAD].in[1].name, LLAMAVID_I64, (void *)qids, 2, 1, L, 0, 0);
    set_tensor(&in[2], c->io[ST_HEAD].in[2].name, LLAMAVID_I64, (void *)qmask, 2, 1, L, 0, 0);
    set_tensor(&out[0], c->io[ST_HEAD].out[0].name, LLAMAVID_F32, s->frame_tokens, 3, n, i->tokens_per_frame, i->hidden, 0);
    return run_stage(s, ST_HEAD, in, 3, out, 1);
}

float *session_feats(llamavid_session *s) { return s->feats; }
float *session_frame_tokens(llamavid_session *s) { return s->frame_tokens; }
int32_t session_capacity(const llamavid_session *s) { return s->n_ctx; }
const llamavid_model *session_model(const llamavid_session *s) { return s->m; }

/* frame f's tokens [n+1, H], encoding the chunk that holds it when needed */
static llamavid_error *frame_tokens(llamavid_session *s, const llamavid_prompt *p, int32_t f, const float **out) {
    const llamavid_model_info *i = &s->m->cfg.info;
    if (f < s->chunk_start || f >= s->chunk_start + s->chunk_len) {
        int32_t n = p->n_frames - f < s->frame_chunk ? p->n_frames - f : s->frame_chunk;
        llamavid_error *e = session_encode(s, p->pixels + (size_t)f * 3 * i->image_size * i->image_size, n,
                                           p->qformer_ids, p->qformer_mask, p->n_qformer, 1);
        if (e) return e;
        s->chunk_start = f;
        s->chunk_len = n;
    }
    *out = s->frame_tokens + (size_t)(f - s->chunk_start) * (size_t)i->tokens_per_frame * (size_t)i->hidden;
    return NULL;
}

llamavid_error *llamavid_session_encode(llamavid_session *s, const float *pixels, int32_t n_frames,
                                        const int64_t *qids, const int64_t *qmask, int32_t L, float *out) {
    CHECK_SESSION("llamavid_session_encode", s);
    if (!pixels || !out || n_frames < 0 || !qids || !qmask || L < 1)
        return llamavid_error_new(LLAMAVID_ERR_ARGUMENT, "llamavid_session_encode: expected pixels, n_frames >= 0, the "
                                  "question's Q-Former ids and mask [1,L>=1] and an output buffer");
    const llamavid_model_info *i = &s->m->cfg.info;
    const size_t px = 3 * (size_t)i->image_size * (size_t)i->image_size, tok = (size_t)i->tokens_per_frame * (size_t)i->hidden;
    double t0 = now_seconds();
    llamavid_error *e = NULL;
    for (int32_t f = 0; f < n_frames && !e; f += s->frame_chunk) {
        int32_t n = n_frames - f < s->frame_chunk ? n_frames - f : s->frame_chunk;
        if (!(e = session_encode(s, pixels + (size_t)f * px, n, qids, qmask, L, 1)))
            memcpy(out + (size_t)f * tok, s->frame_tokens, (size_t)n * tok * sizeof(float));
    }
    s->chunk_len = 0;
    s->stats.api_seconds += now_seconds() - t0;
    return e;
}

llamavid_error *session_rows(llamavid_session *s, const float *rows, const int32_t *ids, int32_t n) {
    llamavid_error *e = NULL;
    for (int32_t r = 0; r < n && !e; r++)
        e = push_row(s, rows + (size_t)r * (size_t)s->m->cfg.info.hidden, ids ? ids[r] : -1);
    return e;
}

llamavid_error *session_ids(llamavid_session *s, const int32_t *ids, int32_t n) {
    llamavid_error *e = NULL;
    for (int32_t r = 0; r < n && !e; r++) e = push_text(s, ids[r]);
    return e;
}

llamavid_error *session_flush(llamavid_session *s) {
    llamavid_error *e = flush(s);
    s->n_rows = 0;
    return e;
}

/* ---- prompt ----------------------------------------------------------------------------------------------------------- */
/* Checks a prompt before anything runs; *rows: the positions it takes. */
static llamavid_error *check_prompt(const llamavid_session *s, const llamavid_prompt *p, int32_t *placeholders,
                                    int64_t *rows) {
    const llamavid_model_info *i = &s->m->cfg.info;
    int32_t K = 0;
    if (p->n_ids < 0 || (p->n_ids > 0 && !p->ids))
        return llamavid_error_new(LLAMAVID_ERR_ARGUMENT, "prompt: expected n_ids >= 0 ids, found %d and %s", p->n_ids,
                                  p->ids ? "ids" : "NULL ids");
    for (int32_t k = 0; k < p->n_ids; k++) {
        if (p->ids[k] == i->image_id) K++;
        else if (p->ids[k] < 0 || p->ids[k] >= i->vocab_size)
            return llamavid_error_new(LLAMAVID_ERR_ARGUMENT, "prompt: token %d: expected an id in [0, %d) or the image "
                                      "placeholder %d, found %d", k, i->vocab_size, i->image_id, p->ids[k]);
    }
    int have_px = p->pixels && p->n_frames > 0, have_rows = p->embeds && p->n_embeds > 0;
    int32_t visual = have_px ? p->n_frames : have_rows ? p->n_embeds : 0;
    if (p->n_frames < 0 || p->n_embeds < 0 || (have_px && have_rows) || (K > 0) != (visual > 0))
        return llamavid_error_new(LLAMAVID_ERR_ARGUMENT, "prompt: expected visual input (pixels or embeds, not both) "
                                  "exactly when the ids hold image placeholders, found %d placeholder(s), %d frame(s), "
                                  "%d visual row(s)", K, p->pixels ? p->n_frames : 0, p->embeds ? p->n_embeds : 0);
    if (K > 1 && !p->image_counts)
        return llamavid_error_new(LLAMAVID_ERR_ARGUMENT, "prompt: expected image_counts for %d image placeholders, "
                                  "found NULL", K);
    if (K > 0 && p->image_counts) {
        int64_t sum = 0;
        for (int32_t k = 0; k < K; k++) {
            if (p->image_counts[k] < 1)
                return llamavid_error_new(LLAMAVID_ERR_ARGUMENT, "prompt: image_counts[%d]: expected >= 1, found %d", k,
                                          p->image_counts[k]);
            sum += p->image_counts[k];
        }
        if (sum != visual)
            return llamavid_error_new(LLAMAVID_ERR_ARGUMENT, "prompt: image_counts sum to %lld, expected the %d %s given",
                                      (long long)sum, visual, have_px ? "frames" : "visual rows");
    }
    if (have_px && (!p->qformer_ids || !p->qformer_mask || p->n_qformer < 1))
        return llamavid_error_new(LLAMAVID_ERR_ARGUMENT, "prompt: expected the question's Q-Former ids and mask [1,L>=1] "
                                  "with pixels, found %s, %s, L=%d", p->qformer_ids ? "ids" : "NULL ids",
                                  p->qformer_mask ? "mask" : "NULL mask", p->n_qformer);
    *placeholders = K;
    *rows = (int64_t)(p->n_ids - K) + (have_px ? (int64_t)visual * i->tokens_per_frame : visual) + (s->pending >= 0);
    if (s->position + *rows > s->n_ctx)
        return llamavid_error_new(LLAMAVID_ERR_CAPACITY, "llm: KV cache: the prompt needs %lld positions after the %d "
                                  "held, the session holds %d (context %d); use fewer frames or a shorter prompt, or roll "
                                  "back", (long long)*rows, s->position, s->n_ctx, i->context);
    return NULL;
}

static llamavid_error *prompt(llamavid_session *s, const llamavid_prompt *p) {
    const int32_t H = s->m->cfg.info.hidden, n1 = s->m->cfg.info.tokens_per_frame;
    int32_t K;
    int64_t rows;
    llamavid_error *e = check_prompt(s, p, &K, &rows);
    if (e) return e;
    s->n_rows = 0;
    s->chunk_start = s->chunk_len = 0;
    if (s->pending >= 0 && (e = push_text(s, s->pending))) return e;
    s->pending = -1;
    int32_t image = 0, frame = 0;   /* the next placeholder, the next frame (or visual row) */
    for (int32_t k = 0; k < p->n_ids && !e; k++) {
        if (p->ids[k] != s->m->cfg.info.image_id) {
            e = push_text(s, p->ids[k]);
            continue;
        }
        int32_t count = p->image_counts ? p->image_counts[image] : (p->pixels ? p->n_frames : p->n_embeds);
        for (int32_t f = frame; f < frame + count && !e; f++) {
            if (!p->pixels) {
                e = push_row(s, p->embeds + (size_t)f * (size_t)H, -1);
                continue;
            }
            const float *tok;
            if ((e = frame_tokens(s, p, f, &tok))) break;
            for (int32_t r = 0; r < n1 && !e; r++) e = push_row(s, tok + (size_t)r * (size_t)H, -1);
        }
        frame += count;
        image++;
    }
    if (!e) e = flush(s);
    s->n_rows = 0;
    return e;
}

/* Times a public call; nested calls (generate -> next) are counted once. */
#define TIMED(s, call)                        \
    double t0_ = now_seconds();               \
    llamavid_error *e_ = (call);              \
    (s)->stats.api_seconds += now_seconds() - t0_; \
    return e_

llamavid_error *llamavid_session_prompt(llamavid_session *s, const llamavid_prompt *p) {
    CHECK_SESSION("llamavid_session_prompt", s);
    if (!p) return llamavid_error_new(LLAMAVID_ERR_ARGUMENT, "llamavid_session_prompt: expected a prompt, found NULL");
    TIMED(s, prompt(s, p));
}

static int is_stop(const llamavid_session *s, int32_t t) {
    for (int32_t k = 0; k < s->n_stop; k++)
        if (s->stop[k] == t) return 1;
    return 0;
}

llamavid_error *llamavid_session_set_stop(llamavid_session *s, const int32_t *ids, int32_t n) {
    CHECK_SESSION("llamavid_session_set_stop", s);
    if (n < 0 || n > 16 || (n > 0 && !ids))
        return llamavid_error_new(LLAMAVID_ERR_ARGUMENT, "llamavid_session_set_stop: expected 0 to 16 ids, found %d%s",
                                  n, n > 0 && !ids ? " and NULL ids" : "");
    for (int32_t k = 0; k < n; k++) s->stop[k] = ids[k];
    s->n_stop = n;
    return NULL;
}

/* ---- generation --------------------------------------------------------------------------------------------------------- */
static llamavid_error *next(llamavid_session *s, llamavid_sampler *smp, int32_t *token) {
    *token = -1;
    if (s->pending >= 0) {
        if (s->position >= s->n_ctx) return NULL;          /* full: nothing more can be generated */
        s->n_rows = 0;
        llamavid_error *e = push_text(s, s->pending);
        if (!e) e = flush(s);
        s->n_rows = 0;
        if (e) return e;                                  /* pending kept: the KV cache did not take it */
        s->pending = -1;
    }
    if (!s->has_logits)
        return llamavid_error_new(LLAMAVID_ERR_STATE, "llamavid_session_next: expected logits, found none: prompt the "
                                  "session first (an answer that ended with eos, a rollback or a failed call leaves none)");
    int32_t t = llamavid_sampler_sample(smp, s->logits, s->tokens, s->position);
    s->stats.tokens++;
    *token = t;
    if (is_stop(s, t)) s->has_logits = 0;                 /* the answer is over; the stop token stays out */
    else s->pending = t;
    return NULL;
}

static llamavid_error *check_sampler(const llamavid_sampler *smp, int32_t *token) {
    if (!token) return llamavid_error_new(LLAMAVID_ERR_ARGUMENT, "llamavid_session_next: token is NULL");
    *token = -1;
    if (!sampler_live(smp))
        return llamavid_error_new(LLAMAVID_ERR_ARGUMENT, "llamavid_session_next: expected a live sampler, found %s",
                                  smp ? "a freed or invalid handle" : "NULL");
    return NULL;
}

llamavid_error *llamavid_session_next(llamavid_session *s, llamavid_sampler *smp, int32_t *token) {
    CHECK_SESSION("llamavid_session_next", s);
    llamavid_error *e = check_sampler(smp, token);
    if (e) return e;
    TIMED(s, next(s, smp, token));
}

static llamavid_error *generate(llamavid_session *s, llamavid_sampler *smp, int32_t max_new, llamavid_token_fn fn,
                                void *user, int32_t *n_out) {
    int32_t n = 0, t;
    llamavid_error *e = NULL;
    while (n < max_new && !(e = next(s, smp, &t)) && t >= 0 && !is_stop(s, t)) {
        n++;
        if (fn && fn(user, t)) break;
    }
    if (n_out) *n_out = n;
    return e;
}

llamavid_error *llamavid_session_generate(llamavid_session *s, llamavid_sampler *smp, int32_t max_new_tokens,
                                          llamavid_token_fn on_token, void *user, int32_t *n_tokens) {
    CHECK_SESSION("llamavid_session_generate", s);
    int32_t t;
    llamavid_error *e = check_sampler(smp, &t);
    if (e) return e;
    if (n_tokens) *n_tokens = 0;
    TIMED(s, generate(s, smp, max_new_tokens, on_token, user, n_tokens));
}

/* ---- KV control ------------------------------------------------------------------------------------------------------------- */
const float *llamavid_session_logits(const llamavid_session *s) {
    return s && s->magic == MAGIC_SESSION && s->has_logits ? s->logits : NULL;
}

int32_t llamavid_session_position(const llamavid_session *s) {
    return s && s->magic == MAGIC_SESSION ? s->position : -1;
}

llamavid_error *llamavid_session_rollback(llamavid_session *s, int32_t position) {
    CHECK_SESSION("llamavid_session_rollback", s);
    if (position < 0 || position > s->position)
        return llamavid_error_new(LLAMAVID_ERR_ARGUMENT, "llamavid_session_rollback: expected a position in [0, %d], "
                                  "found %d", s->position, position);
    const llamavid_model_info *i = &s->m->cfg.info;
    if (!i->shared_kv && position < s->position) {     /* concat: [kvh, position, d] packed in place */
        size_t d = (size_t)i->head_dim;
        for (int32_t j = 0; j < 2 * i->layers; j++)
            for (int32_t h = 1; h < i->kv_heads; h++)
                memmove(s->kv[j] + (size_t)h * (size_t)position * d, s->kv[j] + (size_t)h * (size_t)s->position * d,
                        (size_t)position * d * sizeof(float));
    }
    s->position = position;
    s->pending = -1;
    s->has_logits = 0;
    return NULL;
}

/* Rotates the head_dim-wide key rows [n, d] by `shift` positions of RoPE (half layout: dims i and i + d/2 pair). */
static void rerotate(const llamavid_session *s, float *rows, size_t n, int32_t shift) {
    const config *c = &s->m->cfg;
    const int32_t d = c->info.head_dim, half = d / 2;
    for (int32_t k = 0; k < half; k++) {
        double inv_freq = pow(c->rope_theta, -2.0 * k / d), a = (double)shift / c->rope_scaling * inv_freq;
        s->rot_cos[k] = cos(a);
        s->rot_sin[k] = sin(a);
    }
    for (size_t r = 0; r < n; r++) {
        float *x = rows + r * (size_t)d;
        for (int32_t k = 0; k < half; k++) {
            double x1 = x[k], x2 = x[k + half];
            x[k] = (float)(x1 * s->rot_cos[k] - x2 * s->rot_sin[k]);
            x[k + half] = (float)(x2 * s->rot_cos[k] + x1 * s->rot_sin[k]);
        }
    }
}

llamavid_error *llamavid_session_evict(llamavid_session *s, int32_t start, int32_t n) {
    CHECK_SESSION("llamavid_session_evict", s);
    if (start < 0 || n < 0 || start + n > s->position)
        return llamavid_error_new(LLAMAVID_ERR_ARGUMENT, "llamavid_session_evict: expected a range inside [0, %d), "
                                  "found start %d, %d positions", s->position, start, n);
    const llamavid_model_info *i = &s->m->cfg.info;
    if (n == 0) return NULL;
    const size_t d = (size_t)i->head_dim, stride = i->shared_kv ? (size_t)s->n_ctx : (size_t)s->position,
                 moved = (size_t)(s->position - start - n), kept_stride = i->shared_kv ? stride : stride - (size_t)n;
    for (int32_t j = 0; j < 2 * i->layers; j++)
        for (int32_t h = 0; h < i->kv_heads; h++) {     /* concat: heads repacked to [kvh, position - n, d] */
            float *src = s->kv[j] + (size_t)h * stride * d, *dst = s->kv[j] + (size_t)h * kept_stride * d;
            memmove(dst, src, (size_t)start * d * sizeof(float));
            memmove(dst + (size_t)start * d, src + (size_t)(start + n) * d, moved * d * sizeof(float));
            if (s->m->cfg.kv_is_key[j]) rerotate(s, dst + (size_t)start * d, moved, -n);
        }
    memmove(s->tokens + start, s->tokens + start + n, moved * sizeof(int32_t));
    s->position -= n;
    s->pending = -1;
    s->has_logits = 0;
    return NULL;
}

void llamavid_session_reset(llamavid_session *s) {
    llamavid_error_free(llamavid_session_rollback(s, 0));
}

llamavid_error *llamavid_session_kv_info(const llamavid_session *s, llamavid_kv_info *info) {
    CHECK_SESSION("llamavid_session_kv_info", s);
    if (!info) return llamavid_error_new(LLAMAVID_ERR_ARGUMENT, "llamavid_session_kv_info: info is NULL");
    *info = (llamavid_kv_info){s->n_ctx, s->position, s->kv_bytes, s->buffer_bytes};
    return NULL;
}

llamavid_error *llamavid_session_stats(const llamavid_session *s, llamavid_stats *stats) {
    CHECK_SESSION("llamavid_session_stats", s);
    if (!stats) return llamavid_error_new(LLAMAVID_ERR_ARGUMENT, "llamavid_session_stats: stats is NULL");
    *stats = s->stats;
    return NULL;
}

/* ---- create / free ------------------------------------------------------------------------------------------------------------ */
static void *alloc(size_t n, size_t size, size_t *bytes, int zero) {
    if (n && size > SIZE_MAX / n) return NULL;
    *bytes += n * size;
    return zero ? calloc(n ? n : 1, size) : malloc(n ? n * size : 1);
}

void llamavid_session_free(llamavid_session *s) {
    if (!s || s->magic != MAGIC_SESSION) return;
    const llamavid_model *m = s->m;
    for (int k = 0; k < N_STAGES; k++)
        if (s->ctx[k] && m->stages[k].backend->close_context)
            m->stages[k].backend->close_context(m->stages[k].handle, s->ctx[k]);
    for (int32_t j = 0; j < 2 * m->cfg.info.layers; j++) {
        if (s->kv) free(s->kv[j]);
        if (s->kv_next) free(s->kv_next[j]);
    }
    free(s->kv); free(s->kv_next); free(s->tokens); free(s->ones); free(s->embeds); free(s->row_ids);
    free(s->feats); free(s->frame_tokens); free(s->logits); free(s->rot_cos); free(s->rot_sin); free(s->llm_in); free(s->llm_out); free(s->check);
    s->magic = MAGIC_FREED;
    free(s);
}

static llamavid_error *allocate(llamavid_session *s) {
    const llamavid_model_info *i = &s->m->cfg.info;
    const size_t L2 = 2 * (size_t)i->layers, H = (size_t)i->hidden, per = (size_t)i->kv_heads * (size_t)s->n_ctx *
                      (size_t)i->head_dim;
    size_t b = 0;
    s->kv = calloc(L2, sizeof *s->kv);
    s->kv_next = i->shared_kv ? NULL : calloc(L2, sizeof *s->kv_next);
    int ok = s->kv && (i->shared_kv || s->kv_next);
    for (size_t j = 0; ok && j < L2; j++) {
        ok = (s->kv[j] = alloc(per, sizeof(float), &s->kv_bytes, 1)) != NULL;
        if (ok && !i->shared_kv) ok = (s->kv_next[j] = alloc(per, sizeof(float), &s->kv_bytes, 1)) != NULL;
    }
    if (!ok)
        return llamavid_error_new(LLAMAVID_ERR_MEMORY, "llamavid_session_create: out of memory for a KV cache of %d "
                                  "positions (%.1f MiB per KV tensor, %zu tensors%s); ask for a smaller n_ctx", s->n_ctx,
                                  (double)per * 4 / (1 << 20), L2, i->shared_kv ? "" : " twice");
    s->tokens = alloc((size_t)s->n_ctx, sizeof(int32_t), &b, 0);
    s->ones = alloc((size_t)s->n_ctx, sizeof(int64_t), &b, 0);
    s->embeds = alloc((size_t)s->n_batch, H * sizeof(float), &b, 0);
    s->row_ids = alloc((size_t)s->n_batch, sizeof(int32_t), &b, 0);
    s->feats = alloc((size_t)s->frame_chunk * (size_t)i->vision_tokens, (size_t)i->vision_width * sizeof(float), &b, 0);
    s->frame_tokens = alloc((size_t)s->frame_chunk * (size_t)i->tokens_per_frame, H * sizeof(float), &b, 0);
    s->logits = alloc((size_t)i->vocab_size, sizeof(float), &b, 0);
    s->rot_cos = alloc((size_t)i->head_dim, sizeof(double), &b, 0);
    s->rot_sin = alloc((size_t)i->head_dim, sizeof(double), &b, 0);
    s->llm_in = alloc(2 + L2, sizeof(llamavid_tensor), &b, 1);
    s->llm_out = alloc(1 + L2, sizeof(llamavid_tensor), &b, 1);
    s->check = alloc(1 + L2, sizeof(llamavid_tensor), &b, 1);
    s->buffer_bytes = b;
    if (!s->tokens || !s->ones || !s->embeds || !s->row_ids || !s->feats || !s->frame_tokens || !s->logits ||
        !s->rot_cos || !s->rot_sin ||
        !s->llm_in || !s->llm_out || !s->check)
        return llamavid_error_new(LLAMAVID_ERR_MEMORY, "llamavid_session_create: out of memory for %.1f MiB of buffers "
                                  "(n_batch %d, frame_chunk %d)", (double)b / (1 << 20), s->n_batch, s->frame_chunk);
    for (int32_t k = 0; k < s->n_ctx; k++) s->ones[k] = 1;
    return NULL;
}

llamavid_error *llamavid_session_create(llamavid_model *m, const llamavid_session_params *p, llamavid_session **out) {
    if (!out) return llamavid_error_new(LLAMAVID_ERR_ARGUMENT, "llamavid_session_create: out is NULL");
    *out = NULL;
    if (!m || m->magic != MAGIC_MODEL)
        return llamavid_error_new(LLAMAVID_ERR_ARGUMENT, "llamavid_session_create: expected an open model, found %s",
                                  m ? "a freed or invalid handle" : "NULL");
    const llamavid_model_info *i = &m->cfg.info;
    llamavid_session_params q = p ? *p : (llamavid_session_params){0, 0, 0};
    if (q.n_ctx < 0 || q.n_ctx > i->context || q.n_batch < 0 || q.frame_chunk < 0 || q.frame_chunk > i->frame_chunk)
        return llamavid_error_new(LLAMAVID_ERR_ARGUMENT, "llamavid_session_create: expected 0 <= n_ctx <= %d (the "
                                  "context), n_batch >= 0, 0 <= frame_chunk <= %d, found %d, %d, %d", i->context,
                                  i->frame_chunk, q.n_ctx, q.n_batch, q.frame_chunk);
    llamavid_session *s = calloc(1, sizeof *s);
    if (!s) return llamavid_error_new(LLAMAVID_ERR_MEMORY, "llamavid_session_create: out of memory");
    s->magic = MAGIC_SESSION;
    s->m = m;
    s->n_ctx = q.n_ctx ? q.n_ctx : i->context;
    s->n_batch = q.n_batch && q.n_batch < s->n_ctx ? q.n_batch : s->n_ctx;
    s->frame_chunk = q.frame_chunk ? q.frame_chunk : i->frame_chunk;
    s->pending = -1;
    s->stop[0] = i->eos;
    s->n_stop = 1;
    llamavid_error *e = allocate(s);
    for (int k = 0; !e && k < N_STAGES; k++) {
        const stage *st = &m->stages[k];
        if (st->backend && st->backend->open_context) {
            e = st->backend->open_context(st->handle, &s->ctx[k]);
            if (e) {
                char prefix[700];
                snprintf(prefix, sizeof prefix, "stage %s (%s): opening a context", STAGE_KEYS[k], st->desc);
                e = error_wrap(e, LLAMAVID_ERR_BACKEND, prefix);
            }
        }
    }
    if (e) {
        llamavid_session_free(s);
        return e;
    }
    *out = s;
    return NULL;
}
