/* stream.c -- llamavid_stream: frames pushed into a warm KV cache, questions at any time (llamavid.h draws the
 * layout). Everything is allocated at create; push, ask and eviction allocate nothing.
 *
 *   push --> pixels[chunk] --full--> encode: vision --> feats --head(ingest ids)--> tokens --> KV (+ subtitles)
 *                                            \--> last K frames: feats ring, tokens ring, subtitles ring
 *   window full --> evict the oldest frames (positions after the prefix; later keys re-rotated)
 *   begin(q) --> [replace: roll back to the first focus frame] --head(q ids) on the feats ring--> focus rows,
 *                question ids --> logits;   next()...;   end --> roll back, warm copies put back from the rings
 */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int32_t start;     /* first position of the frame's tokens */
    double t;
} held_frame;

struct llamavid_stream {
    uint32_t magic;
    llamavid_session *s;
    llamavid_stream_params p;
    int64_t *ingest;                   /* [2, n_ingest]: ids then mask */
    int32_t S, n1, H, N1, Cv, chunk;
    /* frames waiting for their chunk */
    float *pixels;                     /* [chunk, 3, S, S] */
    double *pending_t;                 /* [chunk] */
    int32_t *pending_sub, *pending_sub_n;   /* [chunk, max_subtitle], [chunk] */
    int32_t n_pending;
    double last_t;
    /* frames in the KV cache, oldest first */
    held_frame *held;                  /* [max_held] */
    int32_t n_held, max_held;
    int32_t prefix_len;
    /* the last K encoded frames (frame number % K) */
    float *ring_feats, *ring_tokens;   /* [K, N+1, Cv], [K, n+1, H] */
    int32_t *ring_sub, *ring_sub_n;    /* [K, max_subtitle], [K] */
    int64_t pushed, encoded, evicted;
    int32_t in_ring;                   /* the last frames held in the rings (<= K; 0 after a failed restore) */
    int open;                          /* a question is open */
    int32_t warm_end, base, n_focus;   /* during a question: the warm tier's end, where the question's part starts */
};

llamavid_stream_params llamavid_stream_default_params(void) {
    llamavid_stream_params p = {0};
    p.focus_frames = 8;
    p.focus_replace = 1;
    p.reserve = 64;
    p.evict_frames = 16;
    return p;
}

#define CHECK_STREAM(fn, st)                                                                                     \
    if (!(st) || (st)->magic != MAGIC_STREAM)                                                                     \
        return llamavid_error_new(LLAMAVID_ERR_ARGUMENT, "%s: expected a live stream, found %s", fn,               \
                                  (st) ? "a freed or invalid handle" : "NULL")

static int32_t ring_slot(const llamavid_stream *st, int64_t frame) { return (int32_t)(frame % st->p.focus_frames); }

/* ---- the window: evict the oldest frames until `rows` more positions fit beside the reserve ------------------------- */
static llamavid_error *make_room(llamavid_stream *st, int64_t rows) {
    const int32_t cap = session_capacity(st->s), pos = llamavid_session_position(st->s);
    if (pos + rows + st->p.reserve <= cap) return NULL;
    const int32_t first = st->n_held ? st->held[0].start : pos;
    int32_t drop = 0, freed = 0;
    while (drop < st->n_held) {           /* whole frames, at least evict_frames of them, until the rows fit */
        drop++;
        freed = (drop < st->n_held ? st->held[drop].start : pos) - first;
        if (drop >= st->p.evict_frames && pos - freed + rows + st->p.reserve <= cap) break;
    }
    if (pos - freed + rows + st->p.reserve > cap)
        return llamavid_error_new(LLAMAVID_ERR_CAPACITY, "stream: %lld positions of frames do not fit a window of %d "
                                  "positions (prefix %d, reserve %d) even with every held frame evicted; use a larger "
                                  "n_ctx or a smaller chunk", (long long)rows, cap, st->prefix_len, st->p.reserve);
    llamavid_error *e = llamavid_session_evict(st->s, first, freed);
    if (e) return e;
    memmove(st->held, st->held + drop, (size_t)(st->n_held - drop) * sizeof *st->held);
    st->n_held -= drop;
    for (int32_t k = 0; k < st->n_held; k++) st->held[k].start -= freed;
    st->evicted += drop;
    return NULL;
}

/* ---- ingest: the pending frames through vision and head, into the KV cache ------------------------------------------ */
static llamavid_error *encode_pending(llamavid_stream *st) {
    const int32_t c = st->n_pending;
    if (c == 0) return NULL;
    int64_t rows = 0;
    for (int32_t f = 0; f < c; f++) rows += st->n1 + st->pending_sub_n[f];
    st->n_pending = 0;                     /* on an error the chunk is dropped; what the cache holds is kept */
    llamavid_error *e = make_room(st, rows);
    if (!e) e = session_encode(st->s, st->pixels, c, st->ingest, st->ingest + st->p.n_ingest, st->p.n_ingest, 1);
    if (e) return e;
    const float *feats = session_feats(st->s), *tokens = session_frame_tokens(st->s);
    const size_t fsz = (size_t)st->N1 * (size_t)st->Cv, tsz = (size_t)st->n1 * (size_t)st->H, sub = (size_t)st->p.max_subtitle;
    for (int32_t f = 0; f < c; f++) {
        int32_t start = llamavid_session_position(st->s);
        if (!(e = session_rows(st->s, tokens + f * tsz, NULL, st->n1)) &&
            !(e = session_ids(st->s, st->pending_sub + f * sub, st->pending_sub_n[f])))
            e = session_flush(st->s);          /* a frame is whole in the KV cache before the next one starts */
        if (e) {
            llamavid_error_free(llamavid_session_rollback(st->s, start));
            return e;
        }
        if (st->p.focus_frames > 0) {
            int32_t k = ring_slot(st, st->encoded);
            memcpy(st->ring_feats + k * fsz, feats + f * fsz, fsz * sizeof(float));
            memcpy(st->ring_tokens + k * tsz, tokens + f * tsz, tsz * sizeof(float));
            memcpy(st->ring_sub + k * sub, st->pending_sub + f * sub, (size_t)st->pending_sub_n[f] * sizeof(int32_t));
            st->ring_sub_n[k] = st->pending_sub_n[f];
        }
        st->held[st->n_held++] = (held_frame){start, st->pending_t[f]};
        st->encoded++;
        if (st->in_ring < st->p.focus_frames) st->in_ring++;
    }
    return NULL;
}

llamavid_error *llamavid_stream_push(llamavid_stream *st, const float *pixels, double t, const int32_t *subtitle,
                                     int32_t n_subtitle) {
    CHECK_STREAM("llamavid_stream_push", st);
    if (!pixels || !(t == t))
        return llamavid_error_new(LLAMAVID_ERR_ARGUMENT, "llamavid_stream_push: expected pixels [3,%d,%d] and a time in "
                                  "seconds, found %s", st->S, st->S, pixels ? "a NaN time" : "NULL pixels");
    if (t < st->last_t)
        return llamavid_error_new(LLAMAVID_ERR_ARGUMENT, "llamavid_stream_push: expected a time >= %.3f s (the last "
                                  "frame's), found %.3f s; the frame was not kept", st->last_t, t);
    if (n_subtitle < 0 || n_subtitle > st->p.max_subtitle || (n_subtitle && !subtitle))
        return llamavid_error_new(LLAMAVID_ERR_ARGUMENT, "llamavid_stream_push: expected at most %d subtitle ids, "
                                  "found %d", st->p.max_subtitle, n_subtitle);
    for (int32_t k = 0; k < n_subtitle; k++)
        if (subtitle[k] < 0 || subtitle[k] >= session_model(st->s)->cfg.info.vocab_size)
            return llamavid_error_new(LLAMAVID_ERR_ARGUMENT, "llamavid_stream_push: subtitle id %d: expected an id in "
                                      "[0, %d), found %d", k, session_model(st->s)->cfg.info.vocab_size, subtitle[k]);
    if (st->n_pending == st->chunk) {
        if (st->open)
            return llamavid_error_new(LLAMAVID_ERR_STATE, "llamavid_stream_push: a question is open and %d frames "
                                      "already wait for it to end; the frame was not kept", st->chunk);
        llamavid_error *e = encode_pending(st);
        if (e) return e;
    }
    const int32_t f = st->n_pending++;
    memcpy(st->pixels + (size_t)f * 3 * st->S * st->S, pixels, (size_t)3 * st->S * st->S * sizeof(float));
    if (n_subtitle) memcpy(st->pending_sub + (size_t)f * st->p.max_subtitle, subtitle, (size_t)n_subtitle * sizeof(int32_t));
    st->pending_sub_n[f] = n_subtitle;
    st->pending_t[f] = t;
    st->last_t = t;
    st->pushed++;
    return st->n_pending == st->chunk && !st->open ? encode_pending(st) : NULL;
}

llamavid_error *llamavid_stream_flush(llamavid_stream *st) {
    CHECK_STREAM("llamavid_stream_flush", st);
    if (st->open)
        return llamavid_error_new(LLAMAVID_ERR_STATE, "llamavid_stream_flush: expected no open question, found one "
                                  "(frames are encoded when it ends)");
    return encode_pending(st);
}

/* ---- questions -------------------------------------------------------------------------------------------------------- */
/* The last n_focus held frames' rows, from the rings: tokens recomputed by the head with `q` (NULL: the warm copies). */
static llamavid_error *append_focus(llamavid_stream *st, const llamavid_question *q) {
    const size_t fsz = (size_t)st->N1 * (size_t)st->Cv, tsz = (size_t)st->n1 * (size_t)st->H;
    const int32_t n = st->n_focus;
    const float *tokens = st->ring_tokens;
    llamavid_error *e;
    if (n == 0) return NULL;
    if (q) {
        float *feats = session_feats(st->s);
        for (int32_t f = 0; f < n; f++)
            memcpy(feats + f * fsz, st->ring_feats + ring_slot(st, st->encoded - n + f) * fsz, fsz * sizeof(float));
        if ((e = session_encode(st->s, NULL, n, q->qformer_ids, q->qformer_mask, q->n_qformer, 0))) return e;
        tokens = session_frame_tokens(st->s);
    }
    for (int32_t f = 0; f < n; f++) {
        int32_t k = ring_slot(st, st->encoded - n + f);
        if ((e = session_rows(st->s, tokens + (q ? (size_t)f : (size_t)k) * tsz, NULL, st->n1)) ||
            (e = session_ids(st->s, st->ring_sub + (size_t)k * st->p.max_subtitle, st->ring_sub_n[k])))
            return e;
    }
    return NULL;
}

llamavid_error *llamavid_stream_begin(llamavid_stream *st, const llamavid_question *q) {
    CHECK_STREAM("llamavid_stream_begin", st);
    if (st->open)
        return llamavid_error_new(LLAMAVID_ERR_STATE, "llamavid_stream_begin: expected no open question, found one "
                                  "(one question at a time per stream: end it first)");
    if (!q || q->n_ids < 1 || !q->ids || (st->p.focus_frames > 0 && (!q->qformer_ids || !q->qformer_mask || q->n_qformer < 1)))
        return llamavid_error_new(LLAMAVID_ERR_ARGUMENT, "llamavid_stream_begin: expected the question's ids and, with "
                                  "focus frames, its Q-Former ids and mask [1,L>=1]");
    llamavid_error *e = encode_pending(st);
    if (e) return e;
    int32_t n = st->in_ring < st->n_held ? st->in_ring : st->n_held;
    st->warm_end = llamavid_session_position(st->s);
    st->n_focus = n;
    st->base = st->p.focus_replace && n ? st->held[st->n_held - n].start : st->warm_end;
    int64_t rows = (int64_t)q->n_ids;
    for (int32_t f = 0; f < n; f++) rows += st->n1 + st->ring_sub_n[ring_slot(st, st->encoded - n + f)];
    if (st->base + rows >= session_capacity(st->s))
        return llamavid_error_new(LLAMAVID_ERR_CAPACITY, "stream: the question needs %lld positions after %d, the window "
                                  "holds %d; ask a shorter question or give the stream a larger reserve",
                                  (long long)rows, st->base, session_capacity(st->s));
    st->open = 1;
    if (!(e = llamavid_session_rollback(st->s, st->base)) && !(e = append_focus(st, q)) &&
        !(e = session_ids(st->s, q->ids, q->n_ids)))
        e = session_flush(st->s);
    if (e) llamavid_error_free(llamavid_stream_end(st));
    return e;
}

llamavid_error *llamavid_stream_end(llamavid_stream *st) {
    CHECK_STREAM("llamavid_stream_end", st);
    if (!st->open) return NULL;
    llamavid_error *e = llamavid_session_rollback(st->s, st->base);
    if (!e && st->base < st->warm_end) {               /* the warm copies of the focus frames back in place */
        e = append_focus(st, NULL);
        if (!e) e = session_flush(st->s);
    }
    st->open = 0;
    if (e) {   /* the focus frames' warm copies could not be put back: the cache ends before them, they are dropped */
        llamavid_error_free(llamavid_session_rollback(st->s, st->base));
        if (st->base < st->warm_end) st->n_held -= st->n_focus;
        st->in_ring = 0;
        return e;
    }
    return st->n_pending == st->chunk ? encode_pending(st) : NULL;
}

llamavid_error *llamavid_stream_ask(llamavid_stream *st, const llamavid_question *q, llamavid_sampler *smp,
                                    int32_t max_new_tokens, llamavid_token_fn on_token, void *user, int32_t *n_tokens) {
    llamavid_error *e = llamavid_stream_begin(st, q);
    if (e) return e;
    int32_t room = session_capacity(st->s) - llamavid_session_position(st->s) + 1;
    e = llamavid_session_generate(st->s, smp, max_new_tokens < room ? max_new_tokens : room, on_token, user, n_tokens);
    llamavid_error *e2 = llamavid_stream_end(st);
    if (e) { llamavid_error_free(e2); return e; }
    return e2;
}

llamavid_session *llamavid_stream_session(llamavid_stream *st) {
    return st && st->magic == MAGIC_STREAM ? st->s : NULL;
}

llamavid_error *llamavid_stream_get_info(const llamavid_stream *st, llamavid_stream_info *info) {
    CHECK_STREAM("llamavid_stream_get_info", st);
    if (!info) return llamavid_error_new(LLAMAVID_ERR_ARGUMENT, "llamavid_stream_get_info: info is NULL");
    llamavid_kv_info kv;
    llamavid_error *e = llamavid_session_kv_info(st->s, &kv);
    if (e) return e;
    const size_t K = (size_t)st->p.focus_frames;
    *info = (llamavid_stream_info){st->pushed, st->encoded, st->evicted, st->n_held, st->n_pending,
                                   st->n_held ? st->held[0].t : 0, st->n_held ? st->held[st->n_held - 1].t : 0,
                                   kv.position, kv.capacity, kv.kv_bytes,
                                   K * ((size_t)st->N1 * st->Cv + (size_t)st->n1 * st->H) * sizeof(float),
                                   kv.buffer_bytes + (size_t)st->chunk * 3 * st->S * st->S * sizeof(float)};
    return NULL;
}

/* ---- create / free ------------------------------------------------------------------------------------------------------ */
void llamavid_stream_free(llamavid_stream *st) {
    if (!st || st->magic != MAGIC_STREAM) return;
    llamavid_session_free(st->s);
    free(st->ingest); free(st->pixels); free(st->pending_t); free(st->pending_sub); free(st->pending_sub_n);
    free(st->held); free(st->ring_feats); free(st->ring_tokens); free(st->ring_sub); free(st->ring_sub_n);
    st->magic = MAGIC_FREED;
    free(st);
}

llamavid_error *llamavid_stream_create(llamavid_model *m, const llamavid_stream_params *p, llamavid_stream **out) {
    if (!out) return llamavid_error_new(LLAMAVID_ERR_ARGUMENT, "llamavid_stream_create: out is NULL");
    *out = NULL;
    llamavid_model_info i;
    llamavid_error *e = llamavid_model_get_info(m, &i);
    if (e) return error_wrap(e, LLAMAVID_ERR_ARGUMENT, "llamavid_stream_create");
    if (!p || p->n_prefix < 0 || (p->n_prefix && !p->prefix_ids) || p->n_ingest < 1 || !p->ingest_qformer_ids ||
        !p->ingest_qformer_mask || p->focus_frames < 0 || p->focus_frames > i.frame_chunk || p->reserve < 1 ||
        p->evict_frames < 1 || p->max_subtitle < 0 || p->max_subtitle > 4096)
        return llamavid_error_new(LLAMAVID_ERR_ARGUMENT, "llamavid_stream_create: expected prefix ids, the ingest "
                                  "instruction's Q-Former ids and mask [1,L>=1], 0 <= focus_frames <= %d (the frame "
                                  "chunk), reserve >= 1, evict_frames >= 1, 0 <= max_subtitle <= 4096", i.frame_chunk);
    llamavid_stream *st = calloc(1, sizeof *st);
    if (!st) return llamavid_error_new(LLAMAVID_ERR_MEMORY, "llamavid_stream_create: out of memory");
    st->magic = MAGIC_STREAM;
    st->p = *p;
    st->p.prefix_ids = NULL;                          /* the caller's arrays are copied, not kept */
    st->p.ingest_qformer_ids = st->p.ingest_qformer_mask = NULL;
    st->S = i.image_size, st->n1 = i.tokens_per_frame, st->H = i.hidden, st->N1 = i.vision_tokens;
    st->Cv = i.vision_width, st->chunk = i.frame_chunk;
    llamavid_session_params sp = {p->n_ctx, 0, 0};
    if ((e = llamavid_session_create(m, &sp, &st->s))) {
        llamavid_stream_free(st);
        return e;
    }
    const size_t K = (size_t)p->focus_frames, C = (size_t)st->chunk, sub = (size_t)p->max_subtitle;
    st->max_held = session_capacity(st->s) / st->n1 + 1;
    st->ingest = malloc(2 * (size_t)p->n_ingest * sizeof(int64_t));
    st->pixels = malloc(C * 3 * st->S * st->S * sizeof(float));
    st->pending_t = malloc(C * sizeof(double));
    st->pending_sub = malloc((C * sub + 1) * sizeof(int32_t));
    st->pending_sub_n = calloc(C, sizeof(int32_t));
    st->held = malloc((size_t)st->max_held * sizeof(held_frame));
    st->ring_feats = malloc((K * st->N1 * st->Cv + 1) * sizeof(float));
    st->ring_tokens = malloc((K * st->n1 * st->H + 1) * sizeof(float));
    st->ring_sub = malloc((K * sub + 1) * sizeof(int32_t));
    st->ring_sub_n = calloc(K + 1, sizeof(int32_t));
    if (!st->ingest || !st->pixels || !st->pending_t || !st->pending_sub || !st->pending_sub_n || !st->held ||
        !st->ring_feats || !st->ring_tokens || !st->ring_sub || !st->ring_sub_n) {
        llamavid_stream_free(st);
        return llamavid_error_new(LLAMAVID_ERR_MEMORY, "llamavid_stream_create: out of memory");
    }
    memcpy(st->ingest, p->ingest_qformer_ids, (size_t)p->n_ingest * sizeof(int64_t));
    memcpy(st->ingest + p->n_ingest, p->ingest_qformer_mask, (size_t)p->n_ingest * sizeof(int64_t));
    st->last_t = -1e300;
    if (p->n_prefix + p->reserve + st->n1 >= session_capacity(st->s))
        e = llamavid_error_new(LLAMAVID_ERR_CAPACITY, "llamavid_stream_create: a prefix of %d positions, a reserve of %d "
                               "and one frame do not fit %d positions", p->n_prefix, p->reserve, session_capacity(st->s));
    if (!e && p->n_prefix && !(e = session_ids(st->s, p->prefix_ids, p->n_prefix))) e = session_flush(st->s);
    if (e) {
        llamavid_stream_free(st);
        return e;
    }
    st->prefix_len = p->n_prefix;
    /* a chunk takes at most half the window, so a chunk always fits after evicting older frames */
    int32_t window_frames = (session_capacity(st->s) - p->n_prefix - p->reserve) / (st->n1 + p->max_subtitle);
    if (st->chunk > window_frames / 2) st->chunk = window_frames / 2 > 1 ? window_frames / 2 : 1;
    *out = st;
    return NULL;
}
