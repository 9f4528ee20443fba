/* internal.h -- what the core's files share: Config, Stages, Session, the JSON reader. Not installed. */
#ifndef LLAMAVID_INTERNAL_H
#define LLAMAVID_INTERNAL_H

#include "llamavid.h"

#include <stdbool.h>

#define MAGIC_MODEL 0x4c564d4fu     /* "LVMO" */
#define MAGIC_SESSION 0x4c565345u   /* "LVSE" */
#define MAGIC_SAMPLER 0x4c565341u   /* "LVSA" */
#define MAGIC_STREAM 0x4c565354u    /* "LVST" */
#define MAGIC_FREED 0xdeadbeefu

enum { ST_VISION, ST_HEAD, ST_LLM, ST_PREFILL, N_STAGES };
extern const char *const STAGE_KEYS[N_STAGES];   /* "vision", "head", "llm", "llm_prefill" */

/* ---- json.c: a small DOM reader for manifest.json ------------------------------------------------- */
typedef enum { J_NULL, J_BOOL, J_NUM, J_STR, J_ARR, J_OBJ } json_type;
typedef struct json {
    json_type type;
    double num;                 /* J_NUM, J_BOOL (0/1) */
    char *str;                  /* J_STR; the key of an object member */
    char *key;
    struct json *child, *next;  /* J_ARR / J_OBJ members, in file order */
    int32_t n;                  /* members */
} json;

/* Parses text (NUL-terminated); on failure returns NULL and writes "line L column C: what" to err. */
json *json_parse(const char *text, char *err, size_t err_len);
void json_free(json *j);
const json *json_get(const json *obj, const char *key);          /* NULL if absent or obj not an object */
const json *json_at(const json *arr, int32_t i);                 /* NULL if out of range */

/* ---- sha256.c --------------------------------------------------------------------------------------- */
/* hex: 65 bytes. Returns 0 on success, -1 if the file cannot be read. */
int sha256_file(const char *path, char hex[65]);
void sha256_hex(const void *data, size_t n, char hex[65]);

/* ---- config.c: the manifest as the core needs it ---------------------------------------------------- */
#define MAX_NAME 96
typedef struct {
    char name[MAX_NAME];
    llamavid_dtype dtype;
    int32_t ndim;
    int64_t dims[LLAMAVID_MAX_DIMS];   /* -1 where the manifest has a symbolic dim */
} tensor_spec;

typedef struct {
    int32_t n_in, n_out;
    tensor_spec *in, *out;
    llamavid_tensor *in_t, *out_t;     /* the same as llamavid_tensor (data NULL), for backends */
} stage_spec;

typedef struct {
    char stage[16], role[16], backend[32], precision[16], file[512], built_with[128];
    int32_t index;
} variant_spec;

typedef struct {
    llamavid_model_info info;
    double rope_theta, rope_scaling;
    stage_spec io[3];                  /* vision, head, llm (the prefill graph has the llm's tensors) */
    variant_spec *variants[3];
    int32_t n_variants[3];
    char embeddings[512];              /* relative path of the [vocab,H] float32 .npy */
    unsigned char *kv_is_key;          /* [2*layers] 1 for a key tensor (rotated by RoPE), 0 for a value */
} config;

llamavid_error *config_read(const char *dir, int verify_hashes, const char *manifest_sha256, config *cfg);
void config_free(config *cfg);

/* The embedding table, mapped read-only. */
typedef struct {
    void *map;
    size_t map_len;
    const float *rows;     /* [vocab, hidden] */
} embed_table;
llamavid_error *embed_table_open(const char *dir, const config *cfg, embed_table *t);
void embed_table_close(embed_table *t);

/* ---- model.c ---------------------------------------------------------------------------------------- */
typedef struct {
    const llamavid_backend *backend;   /* NULL: not opened (only the optional prefill stage) */
    void *handle;
    char desc[640];                    /* "vision.onnx fp32 on ort-cpu" */
} stage;

struct llamavid_model {
    uint32_t magic;
    config cfg;
    embed_table embed;
    stage stages[N_STAGES];
};

/* ---- session.c, for stream.c ---- */
/* Encodes frames [n <= frame_chunk] into the session's feats (vision) and frame tokens (head) buffers. */
llamavid_error *session_encode(llamavid_session *s, const float *pixels, int32_t n, const int64_t *qids,
                               const int64_t *qmask, int32_t L, int run_vision);
float *session_feats(llamavid_session *s);          /* [frame_chunk, N+1, Cv] */
float *session_frame_tokens(llamavid_session *s);   /* [frame_chunk, n+1, H] */
/* Appends rows [n, H] (ids: their text ids, or NULL: visual) or text ids; flushed to the llm at n_batch rows
 * and by session_flush. The caller checks the capacity first. */
llamavid_error *session_rows(llamavid_session *s, const float *rows, const int32_t *ids, int32_t n);
llamavid_error *session_ids(llamavid_session *s, const int32_t *ids, int32_t n);
llamavid_error *session_flush(llamavid_session *s);
int32_t session_capacity(const llamavid_session *s);
const llamavid_model *session_model(const llamavid_session *s);

/* ---- sampler.c ---- */
int sampler_live(const llamavid_sampler *s);

/* ---- error.c ------------------------------------------------------------------------------------------ */
/* A new error whose message is "prefix: <inner message>", keeping inner's code unless code != OK; frees inner. */
llamavid_error *error_wrap(llamavid_error *inner, llamavid_code code, const char *prefix);

/* ---- time --------------------------------------------------------------------------------------------- */
double now_seconds(void);

#endif
