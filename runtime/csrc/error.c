/* error.c -- error objects that own their message (NULL means success), dtype names, the clock. */
#define _POSIX_C_SOURCE 200809L
#include "internal.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct llamavid_error {
    llamavid_code code;
    char message[];
};

/* When even the error cannot be allocated, this one is returned (and never freed). */
static struct {
    llamavid_code code;
    char message[64];
} out_of_memory = {LLAMAVID_ERR_MEMORY, "out of memory while reporting an error"};

static llamavid_error *make(llamavid_code code, const char *text) {
    size_t n = strlen(text);
    llamavid_error *e = malloc(sizeof *e + n + 1);
    if (!e)
        return (llamavid_error *)&out_of_memory;
    e->code = code;
    memcpy(e->message, text, n + 1);
    return e;
}

llamavid_error *llamavid_error_new(llamavid_code code, const char *fmt, ...) {
    char buf[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    return make(code == LLAMAVID_OK ? LLAMAVID_ERR_ARGUMENT : code, buf);
}

llamavid_error *error_wrap(llamavid_error *inner, llamavid_code code, const char *prefix) {
    llamavid_error *e = llamavid_error_new(code != LLAMAVID_OK ? code : llamavid_error_code(inner), "%s: %s",
                                           prefix, llamavid_error_message(inner));
    llamavid_error_free(inner);
    return e;
}

llamavid_code llamavid_error_code(const llamavid_error *e) { return e ? e->code : LLAMAVID_OK; }

const char *llamavid_error_message(const llamavid_error *e) { return e ? e->message : ""; }

void llamavid_error_free(llamavid_error *e) {
    if (e && e != (llamavid_error *)&out_of_memory)
        free(e);
}

const char *llamavid_dtype_name(llamavid_dtype t) {
    switch (t) {
    case LLAMAVID_F32: return "float32";
    case LLAMAVID_F16: return "float16";
    case LLAMAVID_BF16: return "bfloat16";
    case LLAMAVID_I64: return "int64";
    case LLAMAVID_I32: return "int32";
    case LLAMAVID_U8: return "uint8";
    }
    return "unknown";
}

size_t llamavid_dtype_size(llamavid_dtype t) {
    switch (t) {
    case LLAMAVID_F32: case LLAMAVID_I32: return 4;
    case LLAMAVID_F16: case LLAMAVID_BF16: return 2;
    case LLAMAVID_I64: return 8;
    case LLAMAVID_U8: return 1;
    }
    return 0;
}

double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}
