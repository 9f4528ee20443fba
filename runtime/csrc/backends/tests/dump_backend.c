/* dump_backend.c -- a backend library (llamavid.h, "backends in shared libraries") that runs a host program such as
 * examples/ask.c end to end without a model: it takes the first variant of every stage; vision appends the pixel
 * values it gets to the file named by option "dump"; every output is zeros except the logits, which make option
 * "token" the greedy choice. Built by tests/test_c_backends.py:
 *   gcc -std=c11 -shared -fPIC -Iruntime/csrc dump_backend.c -o libdump_backend.so
 */
#include "llamavid.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    llamavid_backend table;
    llamavid_error_new_fn error_new;
    char dump[4096];
    long token;
} backend;

typedef struct {
    backend *b;
    int vision, llm;
} stage;

static size_t count(const llamavid_tensor *t) {
    size_t n = 1;
    for (int32_t i = 0; i < t->ndim; i++) n *= (size_t)t->shape[i];
    return n;
}

static llamavid_error *open_stage(void *user, const llamavid_variant *v, void **out) {
    stage *s = calloc(1, sizeof *s);
    backend *b = user;
    if (!s) return b->error_new(LLAMAVID_ERR_MEMORY, "dump: out of memory");
    *s = (stage){b, !strcmp(v->stage, "vision"), !strcmp(v->stage, "llm")};
    *out = s;
    return NULL;
}

static llamavid_error *run(void *handle, void *context, const llamavid_tensor *in, int32_t n_in, llamavid_tensor *out,
                           int32_t n_out) {
    stage *s = handle;
    (void)context, (void)n_in;
    if (s->vision) {
        FILE *f = fopen(s->b->dump, "ab");
        size_t n = count(&in[0]);
        if (!f || fwrite(in[0].data, sizeof(float), n, f) != n) {
            if (f) fclose(f);
            return s->b->error_new(LLAMAVID_ERR_IO, "dump: cannot append to %s", s->b->dump);
        }
        fclose(f);
    }
    for (int32_t i = 0; i < n_out; i++)                           /* every output of the stages is float32 */
        memset(out[i].data, 0, count(&out[i]) * sizeof(float));
    if (s->llm && (size_t)s->b->token < count(&out[0])) ((float *)out[0].data)[s->b->token] = 1.0f;   /* logits [1,1,V] */
    return NULL;
}

static void close_stage(void *handle) { free(handle); }

llamavid_error *llamavid_backend_create(int32_t api_version, llamavid_error_new_fn error_new, const char *const *keys,
                                        const char *const *values, int32_t n, llamavid_backend **out) {
    backend *b = calloc(1, sizeof *b);
    if (!b) return error_new(LLAMAVID_ERR_MEMORY, "dump: out of memory");
    *b = (backend){{"dump", b, open_stage, NULL, run, NULL, close_stage}, error_new, "", 5};
    for (int32_t i = 0; i < n; i++) {
        if (!strcmp(keys[i], "dump")) snprintf(b->dump, sizeof b->dump, "%s", values[i]);
        else if (!strcmp(keys[i], "token")) b->token = strtol(values[i], NULL, 10);
    }
    if (api_version != LLAMAVID_API_VERSION || !b->dump[0]) {
        llamavid_error *e = error_new(LLAMAVID_ERR_ARGUMENT, "dump: expected API version %d and option dump, found "
                                      "%d%s", LLAMAVID_API_VERSION, api_version, b->dump[0] ? "" : " and no dump");
        free(b);
        return e;
    }
    b->table.user = b;
    *out = &b->table;
    return NULL;
}

void llamavid_backend_free(llamavid_backend *b) { free(b ? b->user : NULL); }
