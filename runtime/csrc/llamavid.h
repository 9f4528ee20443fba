/* llamavid.h -- the LLaMA-VID runtime's C API (C11), version 1.
 *
 * LLaMA-VID turns every video frame into 2 LLM tokens (a context token that reads the question and a
 * content token). This library owns what is the same on every backend: the manifest (Config), the frame
 * timeline (frames encoded in chunks), the prompt layout (where the visual tokens go between the text
 * embeddings), KV-cache accounting, the sampler and the generation loop. The stages themselves (vision,
 * head, llm) run on a backend: ONNX Runtime (through the CPython extension), TensorRT (C++), or yours.
 *
 *   artifacts/ (manifest.json) --llamavid_model_open--> llamavid_model     Config + Stages: opened once,
 *                                                                          read-only, shared by threads
 *   llamavid_model --llamavid_session_create--> llamavid_session           KV cache, positions, logits,
 *                                                                          buffers: allocated once
 *   llamavid_session_prompt(ids with image placeholders, frames):
 *     frames [F,3,S,S] --|vision|--> feats [c,N+1,Cv] --|head|--> frame tokens [c,n+1,H]  (c frames a call)
 *     text ids --embedding table--+--> inputs_embeds [1,T,H] (n_batch rows a call) --|llm|--> KV, logits
 *   llamavid_session_next(sampler) : logits --sample--> token --embed--|llm|--> logits ...
 *
 * Errors: every call that can fail returns NULL on success or a llamavid_error, which the caller owns
 * and frees with llamavid_error_free. Its message names the stage and tensor involved. The library never
 * aborts or exits the host process. After an error the session stays usable: its position is the last
 * one whose KV entries are complete (llamavid_session_position), and llamavid_session_reset starts over.
 *
 * Threading: a llamavid_model may be used from any number of threads at once (backends must allow
 * concurrent runs on different contexts). A llamavid_session and a llamavid_sampler belong to one thread
 * at a time. Handles are checked against NULL and, where detectable, against use after free.
 *
 * Memory: llamavid_session_create allocates everything a session needs (KV cache of n_ctx positions,
 * one frame chunk's buffers, n_batch rows of embeddings, logits); prompting and generating allocate
 * nothing (an error object is allocated only when an error happens).
 */
#ifndef LLAMAVID_H
#define LLAMAVID_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define LLAMAVID_API_VERSION 1
#define LLAMAVID_MAX_DIMS 8

/* ---- errors ------------------------------------------------------------------------------------ */
typedef enum {
    LLAMAVID_OK = 0,
    LLAMAVID_ERR_ARGUMENT = 1,  /* a NULL or freed handle, an argument out of range */
    LLAMAVID_ERR_MANIFEST = 2,  /* the artifact directory is refused (version, field, path, hash) */
    LLAMAVID_ERR_IO = 3,        /* a file could not be read */
    LLAMAVID_ERR_BACKEND = 4,   /* no backend runs a stage, or a stage failed while running */
    LLAMAVID_ERR_SHAPE = 5,     /* a backend returned a tensor of another shape or dtype */
    LLAMAVID_ERR_CAPACITY = 6,  /* the prompt or the answer does not fit the KV cache */
    LLAMAVID_ERR_MEMORY = 7,    /* an allocation failed (only in create/open calls) */
    LLAMAVID_ERR_STATE = 8      /* the call does not fit the session's state (e.g. next before a prompt) */
} llamavid_code;

typedef struct llamavid_error llamavid_error;

/* A new error with a printf-style message (for backends). Never returns NULL for code != LLAMAVID_OK. */
llamavid_error *llamavid_error_new(llamavid_code code, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
llamavid_code llamavid_error_code(const llamavid_error *e);        /* LLAMAVID_OK for NULL */
const char *llamavid_error_message(const llamavid_error *e);       /* "" for NULL; owned by e */
void llamavid_error_free(llamavid_error *e);                       /* NULL is fine */

/* ---- tensors and backends ---------------------------------------------------------------------- */
typedef enum { LLAMAVID_F32 = 1, LLAMAVID_F16 = 2, LLAMAVID_BF16 = 3, LLAMAVID_I64 = 4, LLAMAVID_I32 = 5,
               LLAMAVID_U8 = 6 } llamavid_dtype;

const char *llamavid_dtype_name(llamavid_dtype t);                 /* "float32", "int64", ... */
size_t llamavid_dtype_size(llamavid_dtype t);                      /* bytes per element, 0 if unknown */

/* A tensor on caller-owned memory: contiguous, row-major. */
typedef struct {
    const char *name;                  /* the manifest's tensor name */
    llamavid_dtype dtype;
    int32_t ndim;
    int64_t shape[LLAMAVID_MAX_DIMS];
    void *data;
} llamavid_tensor;

/* One variant of a stage as the manifest lists it, handed to a backend's open_stage. */
typedef struct {
    const char *stage;                 /* "vision" | "head" | "llm" */
    const char *role;                  /* "" or "prefill" (an llm graph for the first call of a sequence) */
    const char *backend;               /* the variant's backend: "ort-cpu", "ort-cuda", "ort-openvino", "tensorrt" */
    const char *precision;             /* "fp32", "fp16", "bf16", "int8" */
    const char *file;                  /* path relative to the artifact directory */
    const char *path;                  /* the same, joined with the directory */
    int32_t index;                     /* position in the stage's variants list */
    const llamavid_tensor *inputs;     /* the manifest's tensors of the stage: names, dtypes, shapes (-1 where */
    int32_t n_inputs;                  /* the dim is symbolic); data is NULL. A backend checks its graph or   */
    const llamavid_tensor *outputs;    /* engine against them.                                                */
    int32_t n_outputs;
    const char *built_with;            /* what built the file (the manifest's built_with) as "key=value" pairs
                                          joined by ';', e.g. "tensorrt=10.3.0.26;sm=87"; "" if not recorded */
} llamavid_variant;

/* A backend: a table of functions that run stages on named caller-owned buffers.
 *   open_stage     NULL error and *stage set: this backend runs the variant; NULL error and *stage NULL:
 *                  it does not (the next variant or backend is tried); an error: it should but cannot.
 *   open_context   optional: per-session state of a stage (e.g. a TensorRT execution context); may be NULL.
 *   run            inputs and outputs carry the manifest's names, the shapes the core expects, and buffers
 *                  the core owns. The backend writes the outputs in place; if it produced another shape or
 *                  dtype it says so in outputs[i].shape / .dtype and the core reports the mismatch.
 *                  Called concurrently from several sessions with different contexts.
 *   close_context  optional, close_stage: release what open_* made. */
typedef struct llamavid_backend {
    const char *name;
    void *user;
    llamavid_error *(*open_stage)(void *user, const llamavid_variant *variant, void **stage);
    llamavid_error *(*open_context)(void *stage, void **context);
    llamavid_error *(*run)(void *stage, void *context, const llamavid_tensor *inputs, int32_t n_inputs,
                           llamavid_tensor *outputs, int32_t n_outputs);
    void (*close_context)(void *stage, void *context);
    void (*close_stage)(void *stage);
} llamavid_backend;

/* ---- backends in shared libraries --------------------------------------------------------------- *
 * A backend may live in a shared library (runtime/csrc/backends/tensorrt.cpp builds one) loaded by path. The
 * library exports two C functions, named LLAMAVID_BACKEND_CREATE and LLAMAVID_BACKEND_FREE, of the types below.
 * It uses no symbol of the core: every error it returns is made with the error_new it was given (the host's
 * llamavid_error_new), so the host frees it. Options are strings (keys[i] = values[i]) that the library's
 * header documents; an unknown key is an error. */
#define LLAMAVID_BACKEND_CREATE "llamavid_backend_create"
#define LLAMAVID_BACKEND_FREE "llamavid_backend_free"
typedef llamavid_error *(*llamavid_error_new_fn)(llamavid_code code, const char *fmt, ...);
typedef llamavid_error *(*llamavid_backend_create_fn)(int32_t api_version, llamavid_error_new_fn error_new,
                                                      const char *const *keys, const char *const *values, int32_t n,
                                                      llamavid_backend **out);
typedef void (*llamavid_backend_free_fn)(llamavid_backend *backend);

/* Opens the library at path (dlopen), checks its entry points and creates its backend with the options. *out is
 * for llamavid_model_params.backends; unload it after every model that uses it is freed. */
llamavid_error *llamavid_backend_load(const char *path, const char *const *keys, const char *const *values, int32_t n,
                                      llamavid_backend **out);
void llamavid_backend_unload(llamavid_backend *backend);            /* NULL is fine */

/* ---- model: Config + Stages -------------------------------------------------------------------- */
typedef struct llamavid_model llamavid_model;

typedef struct {
    const llamavid_backend *const *backends;   /* tried in this order for each stage's variants */
    int32_t n_backends;
    int32_t verify_hashes;                     /* 1: check the sha256 of every file the manifest lists */
    const char *manifest_sha256;               /* NULL, or the sha256 (64 lower-case hex digits) manifest.json must
                                                  have: a pinned manifest, or the one the caller already checked */
} llamavid_model_params;

typedef struct {
    int32_t image_size;        /* S: pixel values are [F,3,S,S] float32: (rgb / 255 - mean) / std */
    float mean[3], std[3];
    int32_t vision_tokens;     /* N+1 */
    int32_t vision_width;      /* Cv */
    int32_t tokens_per_frame;  /* n+1: the context token first, then the content tokens */
    int32_t hidden;            /* H */
    int32_t vocab_size;
    int32_t context;           /* the LLM's positions */
    int32_t layers, kv_heads, head_dim;
    int32_t frame_chunk;       /* frames per vision/head call */
    int32_t bos, eos, image_id;
    int32_t shared_kv;         /* 1: one KV buffer per name bound as past and present; 0: present = concat */
    int32_t has_prefill;       /* 1: the llm's first call of a sequence runs on its prefill variant */
} llamavid_model_info;

llamavid_model_params llamavid_model_default_params(void);
/* Reads dir/manifest.json, checks it, maps the text embedding table, opens every stage on the first
 * backend (in params order) that runs one of its variants (in manifest order). */
llamavid_error *llamavid_model_open(const char *dir, const llamavid_model_params *params, llamavid_model **out);
void llamavid_model_free(llamavid_model *m);       /* after every session of it is freed; NULL is fine */
llamavid_error *llamavid_model_get_info(const llamavid_model *m, llamavid_model_info *info);
/* "vision.onnx fp32 on ort-cpu" for stage "vision" | "head" | "llm" | "llm_prefill"; "" if not opened. */
const char *llamavid_model_stage(const llamavid_model *m, const char *stage);

/* ---- sampler ------------------------------------------------------------------------------------ *
 * The sampler (the reference's llamavid_ref.sampling implements the same steps, so seeded sampling
 * gives the same tokens in the reference, in Python and here):
 *   1. repetition_penalty r != 1: each distinct id of the history: l = l > 0 ? l / r : l * r   (float)
 *   2. temperature <= 0: the arg max (the lowest id among equal maxima)
 *   3. candidates sorted by logit, highest first, lower id first among equals; top_k > 0 keeps k of them
 *   4. p_i = exp((l_i - l_max) / temperature) in double; top_p < 1 keeps candidates while the
 *      probability mass before them (cumulative, in order, divided by the sum) is < top_p (the first is
 *      always kept)
 *   5. u = the RNG's next double in [0,1); the first kept candidate whose running sum of p exceeds
 *      u * (sum of kept p) is the token.
 * RNG: xoshiro256** (Blackman and Vigna) seeded with four outputs of splitmix64(seed); a double is
 * (next() >> 11) * 2^-53. */
typedef struct llamavid_sampler llamavid_sampler;

typedef struct {
    float temperature;            /* <= 0: greedy */
    int32_t top_k;                /* 0: all */
    float top_p;                  /* >= 1: all */
    float repetition_penalty;     /* 1: none */
    uint64_t seed;
} llamavid_sampler_params;

llamavid_sampler_params llamavid_sampler_default_params(void);      /* greedy */
llamavid_error *llamavid_sampler_create(const llamavid_sampler_params *p, int32_t n_vocab, llamavid_sampler **out);
void llamavid_sampler_free(llamavid_sampler *s);
void llamavid_sampler_reset(llamavid_sampler *s, uint64_t seed);     /* restart the RNG */
/* logits [n_vocab] (read only), history: ids for the repetition penalty (ids outside the vocabulary are
 * skipped). Returns the token, or -1 for a NULL sampler or logits. */
int32_t llamavid_sampler_sample(llamavid_sampler *s, const float *logits, const int32_t *history, int32_t n_history);
/* The RNG alone (for tests of other implementations): n doubles from seed. */
void llamavid_rng_doubles(uint64_t seed, double *out, int32_t n);

/* ---- session: a conversation's KV cache ---------------------------------------------------------- */
typedef struct llamavid_session llamavid_session;

typedef struct {
    int32_t n_ctx;         /* KV capacity in positions; 0: the model's context */
    int32_t n_batch;       /* embedding rows per llm call while prompting; 0: n_ctx */
    int32_t frame_chunk;   /* frames per vision/head call; 0: the manifest's */
} llamavid_session_params;

/* What llamavid_session_prompt appends. ids holds text ids and, where visual tokens go, the model's
 * image id (-200 for LLaMA-VID); placeholder k takes image_counts[k] frames (or, with embeds, rows), or all
 * of them when image_counts is NULL and there is one placeholder. Visual tokens come either from pixels
 * (encoded here with the question's Q-Former ids) or from embeds (rows of H floats, e.g. computed before). */
typedef struct {
    const int32_t *ids;            /* [n_ids] */
    int32_t n_ids;
    const int32_t *image_counts;   /* [placeholders] or NULL */
    const float *pixels;           /* [n_frames,3,S,S] or NULL */
    int32_t n_frames;
    const int64_t *qformer_ids;    /* [1,n_qformer] with pixels */
    const int64_t *qformer_mask;   /* [1,n_qformer] with pixels */
    int32_t n_qformer;
    const float *embeds;           /* [n_embeds,H] or NULL */
    int32_t n_embeds;
} llamavid_prompt;

typedef struct {
    int32_t capacity;      /* n_ctx */
    int32_t position;      /* positions in the KV cache */
    size_t kv_bytes;       /* bytes of KV buffers this session holds */
    size_t buffer_bytes;   /* every other buffer (frame chunk, embeddings, logits) */
} llamavid_kv_info;

typedef struct {
    int64_t calls[4];          /* vision, head, llm, llm_prefill runs */
    double stage_seconds[4];   /* time inside those runs */
    double api_seconds;        /* time inside llamavid_session_prompt / _next / _generate */
    int64_t tokens;            /* tokens sampled */
} llamavid_stats;

llamavid_error *llamavid_session_create(llamavid_model *m, const llamavid_session_params *p, llamavid_session **out);
void llamavid_session_free(llamavid_session *s);
/* Appends the prompt at the current position (the whole prompt is checked against the capacity before
 * anything runs); afterwards the logits of its last position are ready for llamavid_session_next. */
llamavid_error *llamavid_session_prompt(llamavid_session *s, const llamavid_prompt *p);
/* Samples the next token from the current logits (history: the session's text ids) and, unless it is a
 * stop token (eos unless set otherwise), appends it to the KV cache before the next call needs its logits.
 * A stop token ends the answer (it stays out of the KV cache). *token = -1 when the KV cache is full. */
llamavid_error *llamavid_session_next(llamavid_session *s, llamavid_sampler *sampler, int32_t *token);
/* The generation loop: next() until a stop token, max_new_tokens, a full KV cache or on_token returning
 * nonzero. on_token sees every token but the stop token; *n_tokens (may be NULL) counts them. */
typedef int (*llamavid_token_fn)(void *user, int32_t token);
llamavid_error *llamavid_session_generate(llamavid_session *s, llamavid_sampler *sampler, int32_t max_new_tokens,
                                          llamavid_token_fn on_token, void *user, int32_t *n_tokens);
/* The stop tokens (at most 16; none: answers end only at max_new_tokens or a full cache). Default: eos. */
llamavid_error *llamavid_session_set_stop(llamavid_session *s, const int32_t *ids, int32_t n);
/* Embeddings out: frames [n_frames,3,S,S] --|vision|--|head|--> their tokens [n_frames, tokens_per_frame, H] into
 * `out` (the caller's), frame_chunk frames a call, with the question's Q-Former ids [1,n_qformer]. The KV
 * cache is not touched (for an LLM that runs elsewhere, e.g. a TensorRT-LLM prompt table). */
llamavid_error *llamavid_session_encode(llamavid_session *s, const float *pixels, int32_t n_frames,
                                        const int64_t *qformer_ids, const int64_t *qformer_mask, int32_t n_qformer,
                                        float *out);
/* Logits [vocab] of the last position, NULL when none are ready (no prompt yet, or after a rollback). */
const float *llamavid_session_logits(const llamavid_session *s);
int32_t llamavid_session_position(const llamavid_session *s);                   /* -1 for NULL */
/* Keep positions [0, position): the KV cache of a prefix survives, the rest is dropped. */
llamavid_error *llamavid_session_rollback(llamavid_session *s, int32_t position);
void llamavid_session_reset(llamavid_session *s);                             /* rollback to 0 */
/* Drop positions [start, start + n) and move the later ones down by n: their keys are rotated back by n
 * positions of RoPE (the manifest's rope_theta and linear rope_scaling), so the cache reads as if they had
 * been computed at their new positions (StreamingLLM-style sliding windows). */
llamavid_error *llamavid_session_evict(llamavid_session *s, int32_t start, int32_t n);
llamavid_error *llamavid_session_kv_info(const llamavid_session *s, llamavid_kv_info *info);
llamavid_error *llamavid_session_stats(const llamavid_session *s, llamavid_stats *stats);

/* ---- stream: live video into a warm KV cache --------------------------------------------------------------- *
 *
 *   [prefix: system, "USER: " | pinned]  [frame tokens (+ subtitle ids), oldest first | sliding window]
 *   push(frame, t): frames gather into a chunk (the manifest's frame_chunk, at most half the window); a full
 *     chunk runs vision and head once (with the fixed ingest
 *     instruction's Q-Former ids: context tokens valid for any question) and is appended to the KV cache; the
 *     vision features and tokens of the last focus_frames frames are kept.
 *   window full: the oldest whole frames are evicted (llamavid_session_evict: later keys re-rotated), the
 *     prefix stays (its tokens are the attention sinks).
 *   ask(question): the focus tier, i.e. the last focus_frames frames' tokens recomputed by the head from their
 *     kept features with the question's Q-Former ids, takes the place of their warm copies (focus_replace) or
 *     follows them; then the question's text, the answer; afterwards everything after the warm tier is rolled
 *     back (and warm copies put back), so the time to the first token depends on the question and focus_frames,
 *     not on the hours of video behind them.
 */
typedef struct llamavid_stream llamavid_stream;

typedef struct {
    int32_t n_ctx;                    /* KV capacity in positions; 0: the model's context */
    const int32_t *prefix_ids;        /* the text before the frames, e.g. "<s>A chat ... USER: " (pinned) */
    int32_t n_prefix;
    const int64_t *ingest_qformer_ids;    /* [1, n_ingest]: the fixed instruction the warm frames are encoded with */
    const int64_t *ingest_qformer_mask;
    int32_t n_ingest;
    int32_t focus_frames;             /* recomputed with the question at ask time; 0: warm tier only; <= frame_chunk */
    int32_t focus_replace;            /* 1: the focus frames replace their warm copies; 0: they follow the warm tier */
    int32_t reserve;                  /* positions kept free for the question and the answer */
    int32_t evict_frames;             /* at least this many oldest frames go at once when the window is full */
    int32_t max_subtitle;             /* subtitle ids a frame may carry (long-video mode) */
} llamavid_stream_params;

typedef struct {
    const int32_t *ids;               /* the text after the frames, e.g. "\n<question> ASSISTANT:" */
    int32_t n_ids;
    const int64_t *qformer_ids;       /* [1, n_qformer]: the question as the Q-Former reads it */
    const int64_t *qformer_mask;
    int32_t n_qformer;
} llamavid_question;

typedef struct {
    int64_t frames_pushed, frames_encoded, frames_evicted;
    int32_t frames_held, frames_pending;      /* in the KV cache; waiting for their chunk */
    double first_time, last_time;             /* of the frames held */
    int32_t position, capacity;
    size_t kv_bytes, feature_bytes, buffer_bytes;
} llamavid_stream_info;

llamavid_stream_params llamavid_stream_default_params(void);
/* Creates the stream's session and appends the prefix. */
llamavid_error *llamavid_stream_create(llamavid_model *m, const llamavid_stream_params *p, llamavid_stream **out);
void llamavid_stream_free(llamavid_stream *st);
/* One frame, pixel values [3,S,S] at t seconds (t must not go backwards: such a frame is refused and the
 * stream goes on), optionally followed by its subtitle's ids. Encoded when its chunk is full or at flush/ask. */
llamavid_error *llamavid_stream_push(llamavid_stream *st, const float *pixels, double t, const int32_t *subtitle,
                                     int32_t n_subtitle);
llamavid_error *llamavid_stream_flush(llamavid_stream *st);
/* ask = begin (flush, focus tier, question: the logits are ready), next() on llamavid_stream_session(st) as for
 * any session, end (roll back to the warm tier). While a question is open, push only buffers frames (they are
 * encoded at end). llamavid_stream_ask does all three with llamavid_session_generate. */
llamavid_error *llamavid_stream_begin(llamavid_stream *st, const llamavid_question *q);
llamavid_error *llamavid_stream_end(llamavid_stream *st);
llamavid_error *llamavid_stream_ask(llamavid_stream *st, const llamavid_question *q, llamavid_sampler *sampler,
                                    int32_t max_new_tokens, llamavid_token_fn on_token, void *user, int32_t *n_tokens);
llamavid_session *llamavid_stream_session(llamavid_stream *st);
llamavid_error *llamavid_stream_get_info(const llamavid_stream *st, llamavid_stream_info *info);

#ifdef __cplusplus
}
#endif
#endif /* LLAMAVID_H */
