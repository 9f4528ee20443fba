/* config.c -- manifest.json -> Config: the fields the core needs, each checked for type and range; the stage
 * tensors and variants; every file confined to the artifact directory and (optionally) its sha256 checked;
 * the text embedding table mapped read-only.
 *
 * Stage tensors are read in the manifest's order, which runtime/manifest.py fixes:
 *   vision  in  [pixel_values]                                 out [vision_feats]
 *   head    in  [vision_feats, qformer_ids, qformer_mask]      out [frame_tokens]
 *   llm     in  [inputs_embeds, attention_mask, *past_names]   out [logits, *present_names]
 */
#define _DEFAULT_SOURCE
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

const char *const STAGE_KEYS[N_STAGES] = {"vision", "head", "llm", "llm_prefill"};
static const char *const STAGE_NAMES[3] = {"vision", "head", "llm"};

#define MAX_MANIFEST_BYTES (64 << 20)

/* ---- typed field access: every failure names the field, what was expected and what was found --------- */
static void describe(const json *v, char *out, size_t n) {
    if (!v) { snprintf(out, n, "nothing"); return; }
    switch (v->type) {
    case J_NULL: snprintf(out, n, "null"); break;
    case J_BOOL: snprintf(out, n, v->num ? "true" : "false"); break;
    case J_NUM: snprintf(out, n, "%.17g", v->num); break;
    case J_STR: snprintf(out, n, "the string \"%.60s\"", v->str); break;
    case J_ARR: snprintf(out, n, "an array of %d", v->n); break;
    case J_OBJ: snprintf(out, n, "an object of %d keys", v->n); break;
    }
}

static llamavid_error *bad_field(const char *field, const char *expected, const json *found) {
    char what[160];
    describe(found, what, sizeof what);
    return llamavid_error_new(LLAMAVID_ERR_MANIFEST, "manifest.json: %s: expected %s, found %s; rebuild the "
                              "directory with python -m export.build", field, expected, what);
}

static const json *path_get(const json *root, const char *dotted) {
    char key[128];
    const json *v = root;
    while (v && *dotted) {
        const char *dot = strchr(dotted, '.');
        size_t n = dot ? (size_t)(dot - dotted) : strlen(dotted);
        if (n >= sizeof key) return NULL;
        memcpy(key, dotted, n);
        key[n] = 0;
        v = json_get(v, key);
        dotted += n + (dot ? 1 : 0);
    }
    return v;
}

static llamavid_error *get_int(const json *root, const char *field, int64_t lo, int64_t hi, int32_t *out) {
    const json *v = path_get(root, field);
    if (!v || v->type != J_NUM || v->num != floor(v->num) || v->num < (double)lo || v->num > (double)hi) {
        char expected[96];
        snprintf(expected, sizeof expected, "an integer in [%lld, %lld]", (long long)lo, (long long)hi);
        return bad_field(field, expected, v);
    }
    *out = (int32_t)v->num;
    return NULL;
}

static llamavid_error *get_num(const json *root, const char *field, double lo, double hi, double *out) {
    const json *v = path_get(root, field);
    if (!v || v->type != J_NUM || !(v->num >= lo && v->num <= hi)) {
        char expected[96];
        snprintf(expected, sizeof expected, "a number in [%g, %g]", lo, hi);
        return bad_field(field, expected, v);
    }
    *out = v->num;
    return NULL;
}

static llamavid_error *get_str(const json *root, const char *field, char *out, size_t n) {
    const json *v = path_get(root, field);
    if (!v || v->type != J_STR || strlen(v->str) >= n || !v->str[0])
        return bad_field(field, "a non-empty string", v);
    strcpy(out, v->str);
    return NULL;
}

/* ---- files: confined to the directory, listed in "files", optionally hashed ---------------------------- */
static llamavid_error *check_relative(const char *field, const char *rel) {
    const char *p = rel;
    if (!rel[0] || rel[0] == '/')
        return llamavid_error_new(LLAMAVID_ERR_MANIFEST, "manifest.json: %s: expected a path inside the artifact "
                                  "directory, found \"%s\" (absolute)", field, rel);
    while (*p) {
        size_t n = strcspn(p, "/");
        if ((n == 2 && p[0] == '.' && p[1] == '.') || n == 0)
            return llamavid_error_new(LLAMAVID_ERR_MANIFEST, "manifest.json: %s: expected a path inside the "
                                      "artifact directory, found \"%s\" (an empty or '..' component)", field, rel);
        p += n + (p[n] == '/');
    }
    return NULL;
}

/* dir/rel resolved (symlinks too) must lie inside dir, resolved. */
static llamavid_error *confined(const char *dir, const char *field, const char *rel, char *path, size_t n) {
    llamavid_error *e = check_relative(field, rel);
    if (e) return e;
    char root[PATH_MAX], real[PATH_MAX];
    if (snprintf(path, n, "%s/%s", dir, rel) >= (int)n)
        return llamavid_error_new(LLAMAVID_ERR_MANIFEST, "manifest.json: %s: path too long", field);
    if (!realpath(dir, root))
        return llamavid_error_new(LLAMAVID_ERR_IO, "artifacts %s: expected a directory, found %s", dir, strerror(errno));
    if (!realpath(path, real))
        return llamavid_error_new(LLAMAVID_ERR_MANIFEST, "artifacts %s: expected file %s (%s), found %s", dir, rel,
                                  field, strerror(errno));
    size_t r = strlen(root);
    if (strncmp(real, root, r) != 0 || real[r] != '/')
        return llamavid_error_new(LLAMAVID_ERR_MANIFEST, "artifacts %s: %s: expected a file inside the directory, "
                                  "found %s resolving to %s", dir, field, rel, real);
    return NULL;
}

static llamavid_error *check_files(const char *dir, const json *m, int verify) {
    const json *files = json_get(m, "files");
    if (!files || files->type != J_OBJ)
        return bad_field("files", "an object {relative path: sha256}", files);
    for (const json *f = files->child; f; f = f->next) {
        char path[PATH_MAX], field[600], hex[65];
        snprintf(field, sizeof field, "files[\"%.500s\"]", f->key);
        if (f->type != J_STR || strlen(f->str) != 64)
            return bad_field(field, "a sha256 of 64 hex digits", f);
        llamavid_error *e = confined(dir, field, f->key, path, sizeof path);
        if (e) return e;
        if (!verify) continue;
        if (sha256_file(path, hex) != 0)
            return llamavid_error_new(LLAMAVID_ERR_IO, "artifacts %s: file %s: expected a readable file, found %s",
                                      dir, f->key, strerror(errno));
        if (strcmp(hex, f->str) != 0)
            return llamavid_error_new(LLAMAVID_ERR_MANIFEST, "artifacts %s: file %s was modified: expected sha256 %s, "
                                      "found %s; rebuild with python -m export.build", dir, f->key, f->str, hex);
    }
    return NULL;
}

static llamavid_error *listed(const json *m, const char *field, const char *rel) {
    if (json_get(json_get(m, "files"), rel))
        return NULL;
    return llamavid_error_new(LLAMAVID_ERR_MANIFEST, "manifest.json: %s names %s, which has no entry in 'files'",
                              field, rel);
}

/* ---- stages ------------------------------------------------------------------------------------------- */
static llamavid_dtype parse_dtype(const char *s) {
    static const struct { const char *name; llamavid_dtype t; } names[] = {
        {"float32", LLAMAVID_F32}, {"float16", LLAMAVID_F16}, {"bfloat16", LLAMAVID_BF16},
        {"int64", LLAMAVID_I64}, {"int32", LLAMAVID_I32}, {"uint8", LLAMAVID_U8}};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (strcmp(s, names[i].name) == 0) return names[i].t;
    return 0;
}

static llamavid_error *read_tensors(const json *list, const char *field, tensor_spec **out, llamavid_tensor **pub,
                                    int32_t *n) {
    if (!list || list->type != J_OBJ || list->n < 1 || list->n > 4096)
        return bad_field(field, "an object {tensor name: {shape, dtype}}", list);
    *out = calloc((size_t)list->n, sizeof **out);
    *pub = calloc((size_t)list->n, sizeof **pub);
    if (!*out || !*pub) return llamavid_error_new(LLAMAVID_ERR_MEMORY, "out of memory reading %s", field);
    *n = list->n;
    int32_t i = 0;
    for (const json *t = list->child; t; t = t->next, i++) {
        tensor_spec *s = &(*out)[i];
        char f[256];
        snprintf(f, sizeof f, "%s.%.100s", field, t->key);
        const json *shape = json_get(t, "shape"), *dtype = json_get(t, "dtype");
        if (strlen(t->key) >= MAX_NAME) return bad_field(f, "a tensor name of fewer than 96 bytes", t);
        strcpy(s->name, t->key);
        if (!dtype || dtype->type != J_STR || !(s->dtype = parse_dtype(dtype->str)))
            return bad_field(f, "a dtype (float32, float16, bfloat16, int64, int32, uint8)", dtype);
        if (!shape || shape->type != J_ARR || shape->n < 1 || shape->n > LLAMAVID_MAX_DIMS)
            return bad_field(f, "a shape of 1 to 8 dims", shape);
        s->ndim = shape->n;
        int32_t d = 0;
        for (const json *x = shape->child; x; x = x->next, d++) {
            if (x->type == J_STR) s->dims[d] = -1;
            else if (x->type == J_NUM && x->num == floor(x->num) && x->num >= 0 && x->num < 1e12) s->dims[d] = (int64_t)x->num;
            else return bad_field(f, "dims that are names or non-negative integers", x);
        }
        llamavid_tensor *t2 = &(*pub)[i];
        t2->name = s->name;
        t2->dtype = s->dtype;
        t2->ndim = s->ndim;
        memcpy(t2->shape, s->dims, sizeof t2->shape);
    }
    return NULL;
}

static llamavid_error *read_variants(const json *m, int s, config *cfg) {
    char field[64];
    snprintf(field, sizeof field, "stages.%s.variants", STAGE_NAMES[s]);
    const json *list = path_get(m, field);
    if (!list || list->type != J_ARR || list->n > 256)
        return bad_field(field, "an array of variants", list);
    cfg->variants[s] = calloc((size_t)list->n + 1, sizeof(variant_spec));
    if (!cfg->variants[s]) return llamavid_error_new(LLAMAVID_ERR_MEMORY, "out of memory reading %s", field);
    cfg->n_variants[s] = list->n;
    int32_t i = 0;
    for (const json *v = list->child; v; v = v->next, i++) {
        variant_spec *o = &cfg->variants[s][i];
        char f[96];
        llamavid_error *e;
        snprintf(f, sizeof f, "%s[%d]", field, i);
        o->index = i;
        strcpy(o->stage, STAGE_NAMES[s]);
        const json *role = json_get(v, "role");
        if (role && role->type == J_STR && strlen(role->str) < sizeof o->role) strcpy(o->role, role->str);
        else if (role && role->type != J_NULL) return bad_field(f, "a role string or none", role);
        if ((e = get_str(v, "file", o->file, sizeof o->file)) || (e = get_str(v, "backend", o->backend, sizeof o->backend)) ||
            (e = get_str(v, "precision", o->precision, sizeof o->precision)))
            return error_wrap(e, LLAMAVID_ERR_MANIFEST, f);
        if ((e = check_relative(f, o->file)) || (e = listed(m, f, o->file)))
            return e;
        const json *built = json_get(v, "built_with");         /* {"tensorrt": "10.3.0.26", "sm": 87} */
        for (const json *x = built && built->type == J_OBJ ? built->child : NULL; x; x = x->next) {
            size_t n = strlen(o->built_with);
            if (x->type == J_STR) snprintf(o->built_with + n, sizeof o->built_with - n, "%s%s=%s", n ? ";" : "", x->key, x->str);
            else if (x->type == J_NUM) snprintf(o->built_with + n, sizeof o->built_with - n, "%s%s=%.17g", n ? ";" : "", x->key, x->num);
        }
        const json *extra = json_get(v, "extra_files");
        for (const json *x = extra ? extra->child : NULL; x; x = x->next) {
            if (x->type != J_STR) return bad_field(f, "extra_files as strings", x);
            if ((e = check_relative(f, x->str)) || (e = listed(m, f, x->str))) return e;
        }
    }
    return NULL;
}

/* A tensor of the expected dtype and rank whose fixed dims equal want (-1: any). */
static llamavid_error *expect(const char *stage, const char *io, const tensor_spec *t, llamavid_dtype dtype,
                              int32_t ndim, const int64_t *want) {
    bool ok = t->dtype == dtype && t->ndim == ndim;
    for (int32_t d = 0; ok && d < ndim; d++)
        ok = want[d] < 0 || t->dims[d] < 0 || t->dims[d] == want[d];
    if (ok) return NULL;
    char w[160] = "", f[160] = "";
    for (int32_t d = 0; d < ndim; d++)
        snprintf(w + strlen(w), sizeof w - strlen(w), d ? ",%lld" : "%lld", (long long)want[d]);
    for (int32_t d = 0; d < t->ndim; d++)
        snprintf(f + strlen(f), sizeof f - strlen(f), d ? ",%lld" : "%lld", (long long)t->dims[d]);
    return llamavid_error_new(LLAMAVID_ERR_MANIFEST, "manifest.json: stages.%s.%s.%s: expected %s [%s] (-1: any), "
                              "found %s [%s]", stage, io, t->name, llamavid_dtype_name(dtype), w,
                              llamavid_dtype_name(t->dtype), f);
}

static llamavid_error *check_stage_tensors(config *c, const json *m) {
    const llamavid_model_info *i = &c->info;
    const stage_spec *v = &c->io[0], *h = &c->io[1], *l = &c->io[2];
    llamavid_error *e;
    if (v->n_in != 1 || v->n_out != 1 || h->n_in != 3 || h->n_out != 1 || l->n_in != 2 + 2 * i->layers ||
        l->n_out != 1 + 2 * i->layers)
        return llamavid_error_new(LLAMAVID_ERR_MANIFEST, "manifest.json: stages: expected vision 1 input 1 output, head "
                                  "3 inputs 1 output, llm %d inputs %d outputs (llm.layers %d), found %d/%d, %d/%d, %d/%d",
                                  2 + 2 * i->layers, 1 + 2 * i->layers, i->layers, v->n_in, v->n_out, h->n_in,
                                  h->n_out, l->n_in, l->n_out);
    if (!(c->kv_is_key = calloc(2 * (size_t)i->layers, 1)))
        return llamavid_error_new(LLAMAVID_ERR_MEMORY, "out of memory reading llm.past_names");
    int64_t px[] = {-1, 3, i->image_size, i->image_size}, feats[] = {-1, i->vision_tokens, i->vision_width},
            ids[] = {1, -1}, tokens[] = {-1, i->tokens_per_frame, i->hidden}, embeds[] = {1, -1, i->hidden},
            mask[] = {1, -1}, logits[] = {1, 1, i->vocab_size}, kv[] = {1, i->kv_heads, -1, i->head_dim};
    if ((e = expect("vision", "inputs", &v->in[0], LLAMAVID_F32, 4, px)) ||
        (e = expect("vision", "outputs", &v->out[0], LLAMAVID_F32, 3, feats)) ||
        (e = expect("head", "inputs", &h->in[0], LLAMAVID_F32, 3, feats)) ||
        (e = expect("head", "inputs", &h->in[1], LLAMAVID_I64, 2, ids)) ||
        (e = expect("head", "inputs", &h->in[2], LLAMAVID_I64, 2, ids)) ||
        (e = expect("head", "outputs", &h->out[0], LLAMAVID_F32, 3, tokens)) ||
        (e = expect("llm", "inputs", &l->in[0], LLAMAVID_F32, 3, embeds)) ||
        (e = expect("llm", "inputs", &l->in[1], LLAMAVID_I64, 2, mask)) ||
        (e = expect("llm", "outputs", &l->out[0], LLAMAVID_F32, 3, logits)))
        return e;
    const json *past = path_get(m, "llm.past_names"), *present = path_get(m, "llm.present_names");
    for (int32_t k = 0; k < 2 * i->layers; k++) {
        size_t n = strlen(l->in[2 + k].name);
        int key = n > 4 && strcmp(l->in[2 + k].name + n - 4, ".key") == 0;
        if (!key && !(n > 6 && strcmp(l->in[2 + k].name + n - 6, ".value") == 0))
            return llamavid_error_new(LLAMAVID_ERR_MANIFEST, "manifest.json: llm.past_names[%d]: expected a name ending "
                                      "in .key or .value, found %s", k, l->in[2 + k].name);
        c->kv_is_key[k] = (unsigned char)key;
        const json *pn = json_at(past, k), *qn = json_at(present, k);
        if (!pn || pn->type != J_STR || strcmp(pn->str, l->in[2 + k].name) != 0 || !qn || qn->type != J_STR ||
            strcmp(qn->str, l->out[1 + k].name) != 0)
            return llamavid_error_new(LLAMAVID_ERR_MANIFEST, "manifest.json: llm.past_names/present_names[%d]: expected "
                                      "the llm stage's KV tensors in order (%s, %s)", k, l->in[2 + k].name, l->out[1 + k].name);
        if ((e = expect("llm", "inputs", &l->in[2 + k], LLAMAVID_F32, 4, kv)) ||
            (e = expect("llm", "outputs", &l->out[1 + k], LLAMAVID_F32, 4, kv)))
            return e;
    }
    return NULL;
}

/* ---- the whole manifest ----------------------------------------------------------------------------------- */
static char *read_text(const char *path, llamavid_error **err) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        *err = llamavid_error_new(LLAMAVID_ERR_MANIFEST, "%s: expected manifest.json (written by python -m export.build), "
                                  "found %s", path, strerror(errno));
        return NULL;
    }
    char *buf = malloc(MAX_MANIFEST_BYTES + 1);
    size_t n = buf ? fread(buf, 1, MAX_MANIFEST_BYTES + 1, f) : 0;
    fclose(f);
    if (!buf || n > MAX_MANIFEST_BYTES || memchr(buf, 0, n)) {
        free(buf);
        *err = llamavid_error_new(LLAMAVID_ERR_MANIFEST, "%s: expected a JSON text of at most 64 MiB, found %s", path,
                                  n > MAX_MANIFEST_BYTES ? "a larger file" : "a NUL byte or no memory");
        return NULL;
    }
    buf[n] = 0;
    return buf;
}

static llamavid_error *read_fields(const json *m, config *c) {
    llamavid_model_info *i = &c->info;
    llamavid_error *e;
    char layout[16];
    const json *fmt = json_get(m, "format"), *ver = json_get(m, "manifest_version");
    if (!fmt || fmt->type != J_STR || strcmp(fmt->str, "llamavid-artifacts") != 0 || !ver || ver->type != J_NUM ||
        ver->num != 3) {
        char a[160], b[160];
        describe(fmt, a, sizeof a);
        describe(ver, b, sizeof b);
        return llamavid_error_new(LLAMAVID_ERR_MANIFEST, "manifest.json: expected format 'llamavid-artifacts' version 3, "
                                  "found %s version %s; rebuild the directory with python -m export.build", a, b);
    }
    if ((e = get_int(m, "preprocess.image_size", 1, 4096, &i->image_size)) ||
        (e = get_int(m, "model.tokens_per_frame", 1, 1 << 16, &i->tokens_per_frame)) ||
        (e = get_int(m, "model.vision_width", 1, 1 << 16, &i->vision_width)) ||
        (e = get_int(m, "llm.hidden", 1, 1 << 17, &i->hidden)) ||
        (e = get_int(m, "llm.vocab_size", 1, 1 << 22, &i->vocab_size)) ||
        (e = get_int(m, "llm.context", 1, 1 << 22, &i->context)) ||
        (e = get_int(m, "llm.layers", 1, 1024, &i->layers)) ||
        (e = get_int(m, "llm.kv_heads", 1, 1024, &i->kv_heads)) ||
        (e = get_int(m, "llm.head_dim", 1, 4096, &i->head_dim)) ||
        (e = get_int(m, "runtime.frame_chunk", 1, 4096, &i->frame_chunk)) ||
        (e = get_int(m, "special_ids.bos", 0, i->vocab_size - 1, &i->bos)) ||
        (e = get_int(m, "special_ids.eos", 0, i->vocab_size - 1, &i->eos)) ||
        (e = get_int(m, "special_ids.image", INT32_MIN, -1, &i->image_id)) ||
        (e = get_num(m, "llm.rope_theta", 1.0, 1e12, &c->rope_theta)) ||
        (e = get_num(m, "llm.rope_scaling", 1e-6, 1e6, &c->rope_scaling)) ||
        (e = get_str(m, "llm.kv_layout", layout, sizeof layout)) ||
        (e = get_str(m, "llm.embeddings", c->embeddings, sizeof c->embeddings)))
        return e;
    for (int k = 0; k < 3; k++) {
        double mean, std;
        char fm[32], fs[32];
        snprintf(fm, sizeof fm, "preprocess.mean.%d", k);
        snprintf(fs, sizeof fs, "preprocess.std.%d", k);
        const json *jm = json_at(path_get(m, "preprocess.mean"), k), *js = json_at(path_get(m, "preprocess.std"), k);
        if (!jm || jm->type != J_NUM || !((mean = jm->num) >= -1e3 && mean <= 1e3)) return bad_field(fm, "a number in [-1000, 1000]", jm);
        if (!js || js->type != J_NUM || !((std = js->num) >= 1e-6 && std <= 1e3)) return bad_field(fs, "a number in [1e-06, 1000]", js);
        i->mean[k] = (float)mean;
        i->std[k] = (float)std;
    }
    if (strcmp(layout, "shared") != 0 && strcmp(layout, "concat") != 0)
        return bad_field("llm.kv_layout", "\"shared\" or \"concat\"", path_get(m, "llm.kv_layout"));
    i->shared_kv = strcmp(layout, "shared") == 0;
    for (int s = 0; s < 3; s++) {
        char f[64];
        snprintf(f, sizeof f, "stages.%s.inputs", STAGE_NAMES[s]);
        if ((e = read_tensors(path_get(m, f), f, &c->io[s].in, &c->io[s].in_t, &c->io[s].n_in))) return e;
        snprintf(f, sizeof f, "stages.%s.outputs", STAGE_NAMES[s]);
        if ((e = read_tensors(path_get(m, f), f, &c->io[s].out, &c->io[s].out_t, &c->io[s].n_out))) return e;
        if ((e = read_variants(m, s, c))) return e;
    }
    i->vision_tokens = (int32_t)c->io[0].out[0].dims[1];
    if ((e = check_relative("llm.embeddings", c->embeddings)) || (e = listed(m, "llm.embeddings", c->embeddings)))
        return e;
    return check_stage_tensors(c, m);
}

llamavid_error *config_read(const char *dir, int verify_hashes, const char *manifest_sha256, config *c) {
    char path[PATH_MAX], err[256], hex[65];
    llamavid_error *e = NULL;
    memset(c, 0, sizeof *c);
    if (snprintf(path, sizeof path, "%s/manifest.json", dir) >= (int)sizeof path)
        return llamavid_error_new(LLAMAVID_ERR_ARGUMENT, "artifacts: directory path too long");
    char *text = read_text(path, &e);
    if (!text) return e;
    if (manifest_sha256 && (sha256_hex(text, strlen(text), hex), strcmp(hex, manifest_sha256) != 0)) {
        free(text);
        return llamavid_error_new(LLAMAVID_ERR_MANIFEST, "%s: expected sha256 %.64s (the manifest the caller checked or "
                                  "pinned), found %s: the file changed", path, manifest_sha256, hex);
    }
    json *m = json_parse(text, err, sizeof err);
    free(text);
    if (!m) return llamavid_error_new(LLAMAVID_ERR_MANIFEST, "%s: expected JSON, found a parse error (%s)", path, err);
    if (m->type != J_OBJ) e = bad_field("(top level)", "an object", m);
    if (!e) e = read_fields(m, c);
    if (!e) e = check_files(dir, m, verify_hashes);
    json_free(m);
    if (e) config_free(c);
    return e;
}

void config_free(config *c) {
    for (int s = 0; s < 3; s++) {
        free(c->io[s].in);
        free(c->io[s].out);
        free(c->io[s].in_t);
        free(c->io[s].out_t);
        free(c->variants[s]);
    }
    free(c->kv_is_key);
    memset(c, 0, sizeof *c);
}

/* ---- the embedding table: a .npy of float32 [vocab, hidden], C order -------------------------------------- */
llamavid_error *embed_table_open(const char *dir, const config *c, embed_table *t) {
    char path[PATH_MAX];
    memset(t, 0, sizeof *t);
    llamavid_error *e = confined(dir, "llm.embeddings", c->embeddings, path, sizeof path);
    if (e) return e;
    int fd = open(path, O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0) {
        if (fd >= 0) close(fd);
        return llamavid_error_new(LLAMAVID_ERR_IO, "llm.embeddings %s: expected a readable file, found %s", path,
                                  strerror(errno));
    }
    size_t len = (size_t)st.st_size;
    void *map = len ? mmap(NULL, len, PROT_READ, MAP_SHARED, fd, 0) : MAP_FAILED;
    close(fd);
    if (map == MAP_FAILED)
        return llamavid_error_new(LLAMAVID_ERR_IO, "llm.embeddings %s: cannot map the file (%s)", path, strerror(errno));
    const unsigned char *b = map;
    size_t header = 0, hlen = 0;
    if (len >= 10 && memcmp(b, "\x93NUMPY", 6) == 0) {
        if (b[6] == 1) { hlen = (size_t)b[8] | (size_t)b[9] << 8; header = 10; }
        else if (len >= 12) { hlen = (size_t)b[8] | (size_t)b[9] << 8 | (size_t)b[10] << 16 | (size_t)b[11] << 24; header = 12; }
    }
    char want_shape[64], dict[512] = "";
    snprintf(want_shape, sizeof want_shape, "(%d, %d)", c->info.vocab_size, c->info.hidden);
    if (header && header + hlen <= len && hlen < sizeof dict) memcpy(dict, b + header, hlen), dict[hlen] = 0;
    size_t rows = (size_t)c->info.vocab_size * (size_t)c->info.hidden * 4;
    if (!header || !strstr(dict, "'descr': '<f4'") || !strstr(dict, "'fortran_order': False") ||
        !strstr(dict, want_shape) || header + hlen + rows != len || (header + hlen) % 4) {
        munmap(map, len);
        return llamavid_error_new(LLAMAVID_ERR_MANIFEST, "llm.embeddings %s: expected a .npy of float32 %s in C order "
                                  "(%zu bytes of data), found header %.200s and %zu bytes", path, want_shape, rows,
                                  header ? dict : "(not a .npy file)", len);
    }
    t->map = map;
    t->map_len = len;
    t->rows = (const float *)(b + header + hlen);
    return NULL;
}

void embed_table_close(embed_table *t) {
    if (t->map) munmap(t->map, t->map_len);
    memset(t, 0, sizeof *t);
}
