/* json.c -- a small recursive-descent JSON reader (RFC 8259) for manifest.json: a DOM of json nodes,
 * object members kept in file order, nesting limited to MAX_DEPTH, errors with line and column. */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_DEPTH 64

typedef struct {
    const char *s, *p;
    char *err;
    size_t err_len;
} parser;

static int fail(parser *ps, const char *what) {
    if (ps->err[0])
        return 0;
    int line = 1, col = 1;
    for (const char *q = ps->s; q < ps->p; q++) {
        if (*q == '\n') {
            line++;
            col = 1;
        } else {
            col++;
        }
    }
    snprintf(ps->err, ps->err_len, "line %d column %d: %s", line, col, what);
    return 0;
}

static void skip_ws(parser *ps) {
    while (*ps->p == ' ' || *ps->p == '\t' || *ps->p == '\n' || *ps->p == '\r')
        ps->p++;
}

static json *node(json_type t) {
    json *j = calloc(1, sizeof *j);
    if (j)
        j->type = t;
    return j;
}

void json_free(json *j) {
    while (j) {
        json *next = j->next;
        json_free(j->child);
        free(j->str);
        free(j->key);
        free(j);
        j = next;
    }
}

static int hex4(const char *p, unsigned *out) {
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        char c = p[i];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f') v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') v |= (unsigned)(c - 'A' + 10);
        else return 0;
    }
    *out = v;
    return 1;
}

static size_t put_utf8(char *o, unsigned cp) {
    if (cp < 0x80) { o[0] = (char)cp; return 1; }
    if (cp < 0x800) { o[0] = (char)(0xC0 | (cp >> 6)); o[1] = (char)(0x80 | (cp & 0x3F)); return 2; }
    if (cp < 0x10000) {
        o[0] = (char)(0xE0 | (cp >> 12)); o[1] = (char)(0x80 | ((cp >> 6) & 0x3F)); o[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    o[0] = (char)(0xF0 | (cp >> 18)); o[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    o[2] = (char)(0x80 | ((cp >> 6) & 0x3F)); o[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* At the opening quote; returns a malloc'd UTF-8 string (escapes decoded) or NULL after fail(). */
static char *parse_string(parser *ps) {
    ps->p++;
    size_t cap = 0;
    while (ps->p[cap] && ps->p[cap] != '"') {     /* an upper bound of the decoded length */
        if (ps->p[cap] == '\\' && ps->p[cap + 1])
            cap++;
        cap++;
    }
    char *out = malloc(cap + 1), *o = out;
    if (!out) {
        fail(ps, "out of memory");
        return NULL;
    }
    while (*ps->p != '"') {
        unsigned char c = (unsigned char)*ps->p;
        if (c == 0) { free(out); fail(ps, "expected '\"' to end a string, found the end of the file"); return NULL; }
        if (c < 0x20) { free(out); fail(ps, "expected no control character inside a string"); return NULL; }
        if (c != '\\') { *o++ = (char)c; ps->p++; continue; }
        char e = ps->p[1];
        ps->p += 2;
        switch (e) {
        case '"': *o++ = '"'; break;
        case '\\': *o++ = '\\'; break;
        case '/': *o++ = '/'; break;
        case 'b': *o++ = '\b'; break;
        case 'f': *o++ = '\f'; break;
        case 'n': *o++ = '\n'; break;
        case 'r': *o++ = '\r'; break;
        case 't': *o++ = '\t'; break;
        case 'u': {
            unsigned cp, lo;
            if (!hex4(ps->p, &cp)) { free(out); fail(ps, "expected 4 hex digits after \\u"); return NULL; }
            ps->p += 4;
            if (cp >= 0xD800 && cp < 0xDC00 && ps->p[0] == '\\' && ps->p[1] == 'u' && hex4(ps->p + 2, &lo) &&
                lo >= 0xDC00 && lo < 0xE000) {
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                ps->p += 6;
            }
            o += put_utf8(o, cp);   /* \uXXXX takes 6 input bytes, at most 3 output bytes (4 for a pair of 12) */
            break;
        }
        default: free(out); ps->p -= 1; fail(ps, "expected a JSON escape (\\\" \\\\ \\/ \\b \\f \\n \\r \\t \\u)"); return NULL;
        }
    }
    ps->p++;
    *o = 0;
    return out;
}

static json *parse_value(parser *ps, int depth);

static json *parse_container(parser *ps, int depth, json_type t) {
    char close = t == J_ARR ? ']' : '}';
    json *j = node(t), **tail;
    if (!j) { fail(ps, "out of memory"); return NULL; }
    tail = &j->child;
    ps->p++;
    skip_ws(ps);
    if (*ps->p == close) { ps->p++; return j; }
    for (;;) {
        char *key = NULL;
        skip_ws(ps);
        if (t == J_OBJ) {
            if (*ps->p != '"') { fail(ps, "expected a member name in double quotes"); goto bad; }
            key = parse_string(ps);
            if (!key) goto bad;
            skip_ws(ps);
            if (*ps->p != ':') { free(key); fail(ps, "expected ':' after a member name"); goto bad; }
            ps->p++;
        }
        json *v = parse_value(ps, depth + 1);
        if (!v) { free(key); goto bad; }
        v->key = key;
        *tail = v;
        tail = &v->next;
        j->n++;
        skip_ws(ps);
        if (*ps->p == ',') { ps->p++; continue; }
        if (*ps->p == close) { ps->p++; return j; }
        fail(ps, t == J_ARR ? "expected ',' or ']' in an array" : "expected ',' or '}' in an object");
        goto bad;
    }
bad:
    json_free(j);
    return NULL;
}

static json *parse_value(parser *ps, int depth) {
    if (depth > MAX_DEPTH) { fail(ps, "expected at most 64 levels of nesting"); return NULL; }
    skip_ws(ps);
    char c = *ps->p;
    if (c == '{') return parse_container(ps, depth, J_OBJ);
    if (c == '[') return parse_container(ps, depth, J_ARR);
    if (c == '"') {
        char *s = parse_string(ps);
        json *j = s ? node(J_STR) : NULL;
        if (!j) { free(s); return NULL; }
        j->str = s;
        return j;
    }
    static const struct { const char *word; json_type t; double v; } words[] = {
        {"true", J_BOOL, 1}, {"false", J_BOOL, 0}, {"null", J_NULL, 0}};
    for (size_t i = 0; i < 3; i++) {
        size_t n = strlen(words[i].word);
        if (strncmp(ps->p, words[i].word, n) == 0) {
            json *j = node(words[i].t);
            if (!j) { fail(ps, "out of memory"); return NULL; }
            j->num = words[i].v;
            ps->p += n;
            return j;
        }
    }
    if (c == '-' || (c >= '0' && c <= '9')) {
        const char *q = ps->p;            /* the JSON number grammar, then strtod on it */
        if (*q == '-') q++;
        if (!(*q >= '0' && *q <= '9')) { fail(ps, "expected a digit"); return NULL; }
        while (*q >= '0' && *q <= '9') q++;
        if (*q == '.') { q++; if (!(*q >= '0' && *q <= '9')) { fail(ps, "expected a digit after '.'"); return NULL; }
                         while (*q >= '0' && *q <= '9') q++; }
        if (*q == 'e' || *q == 'E') { q++; if (*q == '+' || *q == '-') q++;
                                      if (!(*q >= '0' && *q <= '9')) { fail(ps, "expected an exponent"); return NULL; }
                                      while (*q >= '0' && *q <= '9') q++; }
        json *j = node(J_NUM);
        if (!j) { fail(ps, "out of memory"); return NULL; }
        j->num = strtod(ps->p, NULL);
        ps->p = q;
        return j;
    }
    fail(ps, c ? "expected a JSON value" : "expected a JSON value, found the end of the file");
    return NULL;
}

json *json_parse(const char *text, char *err, size_t err_len) {
    parser ps = {text, text, err, err_len};
    err[0] = 0;
    json *j = parse_value(&ps, 0);
    if (!j)
        return NULL;
    skip_ws(&ps);
    if (*ps.p) {
        fail(&ps, "expected the end of the file after the top-level value");
        json_free(j);
        return NULL;
    }
    return j;
}

const json *json_get(const json *obj, const char *key) {
    if (!obj || obj->type != J_OBJ)
        return NULL;
    const json *found = NULL;
    for (const json *c = obj->child; c; c = c->next)
        if (strcmp(c->key, key) == 0)
            found = c;                      /* the last duplicate wins, as in Python's json */
    return found;
}

const json *json_at(const json *arr, int32_t i) {
    if (!arr || arr->type != J_ARR || i < 0)
        return NULL;
    const json *c = arr->child;
    while (c && i--)
        c = c->next;
    return c;
}
