/* test_core.c -- unit tests of the C core with a small deterministic toy backend: sampler and RNG, prompt layout
 * and the frame timeline, KV accounting and rollback (both KV layouts, with and without a prefill graph), every
 * error path, and zero heap allocations per generated token (malloc/calloc/realloc counted through the linker's
 * --wrap). Built and run by tests/test_c_core.py (also under -fsanitize=address,undefined).
 *
 * The toy model, which the test also computes on its own to check the core's layout:
 *   vision  feats[f,t,c]   = mean(pixels of frame f) + 0.01 t + 0.001 c
 *   head    tokens[f,r,h]  = feats[f,0,0] (r+1) + 0.1 h + 0.01 sum(question ids where mask)
 *   llm     KV at position p: key/value[layer j][head g][p][e] = row_p[(g D + e) % H] + j
 *           logits[v] = sum over positions p of key[0][0][p][v % D] (1 + v % 3) (1 + 0.05 p) + 0.001 v
 */
#define _DEFAULT_SOURCE
#include "../llamavid.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* ---- counting allocations (link with -Wl,--wrap=malloc,--wrap=calloc,--wrap=realloc) ------------------------------- */
static long n_alloc;
void *__real_malloc(size_t n);
void *__real_calloc(size_t n, size_t m);
void *__real_realloc(void *p, size_t n);
void *__wrap_malloc(size_t n) { n_alloc++; return __real_malloc(n); }
void *__wrap_calloc(size_t n, size_t m) { n_alloc++; return __real_calloc(n, m); }
void *__wrap_realloc(void *p, size_t n) { n_alloc++; return __real_realloc(p, n); }

/* ---- checks -------------------------------------------------------------------------------------------------------- */
static int failures, checks;
#define CHECK(cond, ...) do { checks++; if (!(cond)) { failures++; printf("FAIL %s:%d: ", __FILE__, __LINE__); \
                              printf(__VA_ARGS__); printf("\n"); } } while (0)
#define OK(call) do { llamavid_error *e_ = (call); checks++; if (e_) { failures++; printf("FAIL %s:%d: %s -> %s\n", \
                      __FILE__, __LINE__, #call, llamavid_error_message(e_)); llamavid_error_free(e_); } } while (0)
/* the call fails with `code` and a message containing `part` */
#define FAILS(call, code, part) do { llamavid_error *e_ = (call); checks++; \
    if (!e_ || llamavid_error_code(e_) != (code) || !strstr(llamavid_error_message(e_), part)) { failures++; \
        printf("FAIL %s:%d: %s: expected code %d with \"%s\", found code %d \"%s\"\n", __FILE__, __LINE__, #call, \
               (int)(code), part, (int)llamavid_error_code(e_), llamavid_error_message(e_)); } \
    llamavid_error_free(e_); } while (0)

/* ---- the toy model's sizes ------------------------------------------------------------------------------------------ */
enum { S = 4, N1 = 5, CV = 6, NTOK = 2, H = 8, V = 40, CTX = 64, LAYERS = 2, KVH = 2, D = 4, CHUNK = 3, IMAGE = -200,
       BOS = 1, EOS = 2 };

static float embed_row(int id, int h) { return 0.01f * (float)((id * 7 + h * 3) % 17) - 0.05f; }

/* ---- toy backend ------------------------------------------------------------------------------------------------------ */
typedef struct {
    char stage[16];
    int prefill;
    long calls;
} toy_stage;

static struct {
    int fail_llm_at;        /* fail the llm call with this number (1-based), 0: never */
    int wrong_head_shape;   /* report frame_tokens with one token too many */
    int wrong_logits_dtype; /* report logits as float16 */
    long llm_calls;
    int refuse_all;         /* open_stage runs nothing */
    int contexts;           /* open contexts */
    int shared;             /* the manifest's layout */
} toy;

static llamavid_error *toy_open(void *user, const llamavid_variant *v, void **stage) {
    (void)user;
    *stage = NULL;
    if (toy.refuse_all) return NULL;
    toy_stage *t = calloc(1, sizeof *t);
    snprintf(t->stage, sizeof t->stage, "%s", v->stage);
    t->prefill = strcmp(v->role, "prefill") == 0;
    if (strcmp(v->stage, "head") == 0 && (v->n_inputs != 3 || strcmp(v->inputs[1].name, "qformer_ids") != 0 ||
                                          v->inputs[1].dtype != LLAMAVID_I64 || v->outputs[0].shape[1] != NTOK))
        return llamavid_error_new(LLAMAVID_ERR_BACKEND, "toy: the head's tensors are not the manifest's");
    *stage = t;
    return NULL;
}
static llamavid_error *toy_open_context(void *stage, void **ctx) { (void)stage; toy.contexts++; *ctx = &toy; return NULL; }
static void toy_close_context(void *stage, void *ctx) { (void)stage; (void)ctx; toy.contexts--; }
static void toy_close(void *stage) { free(stage); }

static const llamavid_tensor *find(const llamavid_tensor *t, int n, const char *name) {
    for (int i = 0; i < n; i++)
        if (strcmp(t[i].name, name) == 0) return &t[i];
    return NULL;
}

static void toy_llm(const toy_stage *t, const llamavid_tensor *in, int n_in, llamavid_tensor *out) {
    const llamavid_tensor *emb = find(in, n_in, "inputs_embeds"), *mask = find(in, n_in, "attention_mask");
    int64_t T = emb->shape[1], total = mask->shape[1], P = total - T;
    const float *rows = emb->data;
    for (int j = 0; j < 2 * LAYERS; j++) {
        const llamavid_tensor *past = &in[2 + j];
        llamavid_tensor *present = &out[1 + j];
        float *dst = present->data;
        int64_t cap = present->shape[2], past_cap = past->shape[2];
        if (!toy.shared || t->prefill)      /* concat: present = past then new; prefill: past is empty */
            for (int g = 0; g < KVH; g++)
                if (dst != past->data) memcpy(dst + g * cap * D, (float *)past->data + g * past_cap * D, (size_t)(P * D) * 4);
        for (int64_t p = 0; p < T; p++)
            for (int g = 0; g < KVH; g++)
                for (int e = 0; e < D; e++)
                    dst[g * cap * D + (P + p) * D + e] = rows[p * H + (g * D + e) % H] + (float)(j / 2);
    }
    const float *key0 = out[1].data;
    float *logits = out[0].data;
    for (int v = 0; v < V; v++) {
        double acc = 0;
        for (int64_t p = 0; p < total; p++) acc += key0[p * D + v % D] * (1 + v % 3) * (1 + 0.05 * (double)p);
        logits[v] = (float)acc + 0.001f * (float)v;
    }
}

static llamavid_error *toy_run(void *stage, void *ctx, const llamavid_tensor *in, int32_t n_in, llamavid_tensor *out,
                               int32_t n_out) {
    toy_stage *t = stage;
    (void)n_out;
    t->calls++;
    if (ctx != &toy) return llamavid_error_new(LLAMAVID_ERR_BACKEND, "toy: wrong context");
    if (strcmp(t->stage, "vision") == 0) {
        const float *px = in[0].data;
        float *feats = out[0].data;
        for (int64_t f = 0; f < in[0].shape[0]; f++) {
            double mean = 0;
            for (int k = 0; k < 3 * S * S; k++) mean += px[f * 3 * S * S + k];
            mean /= 3 * S * S;
            for (int tk = 0; tk < N1; tk++)
                for (int c = 0; c < CV; c++) feats[(f * N1 + tk) * CV + c] = (float)mean + 0.01f * tk + 0.001f * c;
        }
    } else if (strcmp(t->stage, "head") == 0) {
        const float *feats = in[0].data;
        const int64_t *ids = in[1].data, *mask = in[2].data;
        double q = 0;
        for (int64_t k = 0; k < in[1].shape[1]; k++) q += mask[k] ? (double)ids[k] : 0;
        float *tok = out[0].data;
        for (int64_t f = 0; f < in[0].shape[0]; f++)
            for (int r = 0; r < NTOK; r++)
                for (int h = 0; h < H; h++)
                    tok[(f * NTOK + r) * H + h] = feats[f * N1 * CV] * (r + 1) + 0.1f * h + 0.01f * (float)q;
        if (toy.wrong_head_shape) out[0].shape[1] = NTOK + 1;
    } else {
        if (++toy.llm_calls == toy.fail_llm_at) return llamavid_error_new(LLAMAVID_ERR_BACKEND, "toy: device lost");
        toy_llm(t, in, n_in, out);
        if (toy.wrong_logits_dtype) out[0].dtype = LLAMAVID_F16;
    }
    return NULL;
}

static const llamavid_backend TOY = {"toy", NULL, toy_open, toy_open_context, toy_run, toy_close_context, toy_close};

/* ---- an artifact directory for the toy ------------------------------------------------------------------------------- */
static char dir[256];

static void write_file(const char *name, const void *data, size_t n) {
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    fwrite(data, 1, n, f);
    fclose(f);
}

static void write_embeddings(void) {
    char header[128];
    int n = snprintf(header, sizeof header, "{'descr': '<f4', 'fortran_order': False, 'shape': (%d, %d), }", V, H);
    while ((10 + n + 1) % 64) header[n++] = ' ';
    header[n++] = '\n';
    unsigned char pre[10] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0, (unsigned char)(n & 0xff), (unsigned char)(n >> 8)};
    static float rows[V * H];
    for (int v = 0; v < V; v++)
        for (int h = 0; h < H; h++) rows[v * H + h] = embed_row(v, h);
    char path[512];
    snprintf(path, sizeof path, "%s/embed.npy", dir);
    FILE *f = fopen(path, "wb");
    fwrite(pre, 1, 10, f);
    fwrite(header, 1, (size_t)n, f);
    fwrite(rows, sizeof(float), V * H, f);
    fclose(f);
}

#define HASH "0000000000000000000000000000000000000000000000000000000000000000"

/* layout "shared" | "concat"; prefill: also list a prefill variant; `patch`: replace a fragment (bad manifests) */
static void write_manifest(const char *layout, int prefill, const char *from, const char *to) {
    char kv_in[4096] = "", kv_out[4096] = "", past[1024] = "", present[1024] = "";
    for (int j = 0; j < 2 * LAYERS; j++) {
        const char *kv = j % 2 ? "value" : "key";
        snprintf(kv_in + strlen(kv_in), sizeof kv_in - strlen(kv_in), ", \"past_key_values.%d.%s\": {\"shape\": "
                 "[\"batch\", %d, \"max_seq\", %d], \"dtype\": \"float32\"}", j / 2, kv, KVH, D);
        snprintf(kv_out + strlen(kv_out), sizeof kv_out - strlen(kv_out), ", \"present.%d.%s\": {\"shape\": "
                 "[\"batch\", %d, \"max_seq\", %d], \"dtype\": \"float32\"}", j / 2, kv, KVH, D);
        snprintf(past + strlen(past), sizeof past - strlen(past), "%s\"past_key_values.%d.%s\"", j ? ", " : "", j / 2, kv);
        snprintf(present + strlen(present), sizeof present - strlen(present), "%s\"present.%d.%s\"", j ? ", " : "", j / 2, kv);
    }
    static char m[16384];
    snprintf(m, sizeof m,
        "{\"format\": \"llamavid-artifacts\", \"manifest_version\": 3,\n"
        " \"model\": {\"tokens_per_frame\": %d, \"vision_width\": %d},\n"
        " \"preprocess\": {\"image_size\": %d, \"mean\": [0.5, 0.4, 0.3], \"std\": [0.25, 0.25, 0.5]},\n"
        " \"special_ids\": {\"bos\": %d, \"eos\": %d, \"pad\": 0, \"image\": %d},\n"
        " \"runtime\": {\"frame_chunk\": %d},\n"
        " \"llm\": {\"context\": %d, \"layers\": %d, \"kv_heads\": %d, \"head_dim\": %d, \"hidden\": %d, \"vocab_size\": %d,\n"
        "   \"rope_theta\": 10000.0, \"rope_scaling\": 1.0, \"kv_layout\": \"%s\", \"past_names\": [%s],\n"
        "   \"present_names\": [%s], \"embeddings\": \"embed.npy\"},\n"
        " \"stages\": {\n"
        "  \"vision\": {\"inputs\": {\"pixel_values\": {\"shape\": [\"frames\", 3, %d, %d], \"dtype\": \"float32\"}},\n"
        "             \"outputs\": {\"vision_feats\": {\"shape\": [\"frames\", %d, %d], \"dtype\": \"float32\"}},\n"
        "             \"variants\": [{\"file\": \"vision.onnx\", \"precision\": \"fp32\", \"backend\": \"ort-cpu\"}]},\n"
        "  \"head\": {\"inputs\": {\"vision_feats\": {\"shape\": [\"frames\", %d, %d], \"dtype\": \"float32\"},\n"
        "                        \"qformer_ids\": {\"shape\": [1, \"text\"], \"dtype\": \"int64\"},\n"
        "                        \"qformer_mask\": {\"shape\": [1, \"text\"], \"dtype\": \"int64\"}},\n"
        "           \"outputs\": {\"frame_tokens\": {\"shape\": [\"frames\", %d, %d], \"dtype\": \"float32\"}},\n"
        "           \"variants\": [{\"file\": \"head.onnx\", \"precision\": \"fp32\", \"backend\": \"ort-cpu\"}]},\n"
        "  \"llm\": {\"inputs\": {\"inputs_embeds\": {\"shape\": [\"batch\", \"seq\", %d], \"dtype\": \"float32\"},\n"
        "                       \"attention_mask\": {\"shape\": [\"batch\", \"total\"], \"dtype\": \"int64\"}%s},\n"
        "          \"outputs\": {\"logits\": {\"shape\": [\"batch\", 1, %d], \"dtype\": \"float32\"}%s},\n"
        "          \"variants\": [{\"file\": \"llm/decoder.onnx\", \"precision\": \"fp32\", \"backend\": \"ort-cpu\","
        "                          \"extra_files\": [\"embed.npy\"]}%s]}},\n"
        " \"files\": {\"vision.onnx\": \"" HASH "\", \"head.onnx\": \"" HASH "\", \"llm/decoder.onnx\": \"" HASH "\",\n"
        "           \"llm/prefill.onnx\": \"" HASH "\", \"embed.npy\": \"" HASH "\"}}\n",
        NTOK, CV, S, BOS, EOS, IMAGE, CHUNK, CTX, LAYERS, KVH, D, H, V, layout, past, present, S, S, N1, CV, N1, CV,
        NTOK, H, H, kv_in, V, kv_out,
        prefill ? ", {\"file\": \"llm/prefill.onnx\", \"precision\": \"bf16\", \"backend\": \"ort-openvino\", "
                  "\"role\": \"prefill\"}" : "");
    if (from) {                     /* one textual change, for the bad-manifest tests */
        char *at = strstr(m, from);
        if (at) {
            static char t[16384];
            snprintf(t, sizeof t, "%.*s%s%s", (int)(at - m), m, to, at + strlen(from));
            strcpy(m, t);
        }
    }
    write_file("manifest.json", m, strlen(m));
    toy.shared = strcmp(layout, "shared") == 0;
}

static void make_dir(void) {
    snprintf(dir, sizeof dir, "/tmp/llamavid_test_core_XXXXXX");
    if (!mkdtemp(dir)) { perror("mkdtemp"); exit(2); }
    char sub[300];
    snprintf(sub, sizeof sub, "%s/llm", dir);
    mkdir(sub, 0755);
    write_file("vision.onnx", "v", 1);
    write_file("head.onnx", "h", 1);
    write_file("llm/decoder.onnx", "d", 1);
    write_file("llm/prefill.onnx", "p", 1);
    write_embeddings();
}

static llamavid_model *open_model(void) {
    const llamavid_backend *b[] = {&TOY};
    llamavid_model_params p = llamavid_model_default_params();
    p.backends = b;
    p.n_backends = 1;
    p.verify_hashes = 0;
    llamavid_model *m = NULL;
    OK(llamavid_model_open(dir, &p, &m));
    return m;
}

/* ---- the toy model computed here: rows in order -> logits -------------------------------------------------------- */
static float want_rows[CTX][H];
static int want_shift[CTX];            /* RoPE shift the core applied to the row's key by evictions */
static int n_want;

/* key of a row after its shift: RoPE, half layout, theta 10000, over the head's D dims */
static float shifted_key(int p, int e) {
    if (!want_shift[p]) return want_rows[p][e];
    int k = e % (D / 2);
    double a = want_shift[p] * pow(10000.0, -2.0 * k / D), x1 = want_rows[p][k], x2 = want_rows[p][k + D / 2];
    return (float)(e < D / 2 ? x1 * cos(a) - x2 * sin(a) : x2 * cos(a) + x1 * sin(a));
}

static void want_evict(int start, int n) {
    memmove(want_rows[start], want_rows[start + n], (size_t)(n_want - start - n) * sizeof want_rows[0]);
    memmove(want_shift + start, want_shift + start + n, (size_t)(n_want - start - n) * sizeof(int));
    for (int p = start; p < n_want - n; p++) want_shift[p] -= n;
    n_want -= n;
}

static void want_text(int id) {
    for (int h = 0; h < H; h++) want_rows[n_want][h] = embed_row(id, h);
    want_shift[n_want++] = 0;
}

static void want_frame(const float *px, double q) {
    double mean = 0;
    for (int k = 0; k < 3 * S * S; k++) mean += px[k];
    float f00 = (float)(mean / (3 * S * S));
    for (int r = 0; r < NTOK; r++, n_want++) {
        for (int h = 0; h < H; h++) want_rows[n_want][h] = f00 * (r + 1) + 0.1f * h + 0.01f * (float)q;
        want_shift[n_want] = 0;
    }
}

static void want_logits(float *out) {
    for (int v = 0; v < V; v++) {
        double acc = 0;
        for (int p = 0; p < n_want; p++) acc += shifted_key(p, v % D) * (1 + v % 3) * (1 + 0.05 * p);  /* layer 0 key, head 0 */
        out[v] = (float)acc + 0.001f * (float)v;
    }
}

static int close_logits(const float *a, const float *b) {
    for (int v = 0; v < V; v++)
        if (fabsf(a[v] - b[v]) > 1e-4f * (1 + fabsf(b[v]))) return 0;
    return 1;
}

/* ---- tests -------------------------------------------------------------------------------------------------------- */
static float pixels[10][3 * S * S];
static const int64_t QIDS[1][3] = {{5, 9, 11}}, QMASK[1][3] = {{1, 1, 0}};   /* q = 14 */

static void fill_pixels(void) {
    for (int f = 0; f < 10; f++)
        for (int k = 0; k < 3 * S * S; k++) pixels[f][k] = 0.05f * (float)((f * 13 + k * 5) % 11) - 0.2f;
}

static llamavid_prompt video_prompt(const int32_t *ids, int n_ids, int frames) {
    llamavid_prompt p = {0};
    p.ids = ids;
    p.n_ids = n_ids;
    p.pixels = pixels[0];
    p.n_frames = frames;
    p.qformer_ids = QIDS[0];
    p.qformer_mask = QMASK[0];
    p.n_qformer = 3;
    return p;
}

/* a prompt of text, a 7-frame video (3 chunks of at most 3), text: the layout, chunking and logits */
static void test_prompt_layout(const char *layout, int prefill, int n_batch) {
    write_manifest(layout, prefill, NULL, NULL);
    llamavid_model *m = open_model();
    llamavid_session *s = NULL;
    llamavid_session_params sp = {0, n_batch, 0};
    OK(llamavid_session_create(m, &sp, &s));
    const int32_t ids[] = {BOS, 7, 8, IMAGE, 9, 10};
    llamavid_prompt p = video_prompt(ids, 6, 7);
    OK(llamavid_session_prompt(s, &p));
    n_want = 0;
    want_text(BOS); want_text(7); want_text(8);
    for (int f = 0; f < 7; f++) want_frame(pixels[f], 14);
    want_text(9); want_text(10);
    float want[V];
    want_logits(want);
    const float *logits = llamavid_session_logits(s);
    CHECK(logits && close_logits(logits, want), "%s prefill=%d n_batch=%d: logits of the laid-out prompt", layout,
          prefill, n_batch);
    CHECK(llamavid_session_position(s) == 5 + 7 * NTOK, "position %d", llamavid_session_position(s));
    llamavid_stats st;
    OK(llamavid_session_stats(s, &st));
    CHECK(st.calls[0] == 3 && st.calls[1] == 3, "3 vision and 3 head calls for 7 frames in chunks of 3, found %lld %lld",
          (long long)st.calls[0], (long long)st.calls[1]);
    int64_t llm_calls = (19 + (n_batch ? n_batch : CTX) - 1) / (n_batch ? n_batch : CTX);
    CHECK(st.calls[2] + st.calls[3] == llm_calls && st.calls[3] == (prefill ? 1 : 0),
          "llm calls %lld + prefill %lld, expected %lld", (long long)st.calls[2], (long long)st.calls[3], (long long)llm_calls);

    /* greedy generation; rolling back to the prompt and generating again gives the same tokens */
    llamavid_sampler *smp = NULL;
    llamavid_sampler_params gp = llamavid_sampler_default_params();
    OK(llamavid_sampler_create(&gp, V, &smp));
    int32_t first[6], again[6], t;
    int pos_prompt = llamavid_session_position(s);
    for (int k = 0; k < 6; k++) {
        OK(llamavid_session_next(s, smp, &t));
        first[k] = t;
        if (k == 0) {                       /* the first token is the arg max of the prompt's logits */
            int best = 0;
            for (int v = 1; v < V; v++) if (want[v] > want[best]) best = v;
            CHECK(t == best, "first greedy token %d, arg max %d", t, best);
        }
    }
    CHECK(llamavid_session_position(s) == pos_prompt + 5, "5 tokens appended, the 6th pending: %d",
          llamavid_session_position(s));
    /* the same prefix prompted again on a rolled-back cache */
    OK(llamavid_session_rollback(s, 3));
    CHECK(llamavid_session_logits(s) == NULL, "no logits after a rollback");
    const int32_t rest[] = {IMAGE, 9, 10};
    llamavid_prompt p2 = video_prompt(rest, 3, 7);
    OK(llamavid_session_prompt(s, &p2));
    CHECK(close_logits(llamavid_session_logits(s), want), "%s: logits after rollback to 3 and the rest again", layout);
    for (int k = 0; k < 6; k++) {
        OK(llamavid_session_next(s, smp, &t));
        again[k] = t;
    }
    CHECK(memcmp(first, again, sizeof first) == 0, "%s: greedy tokens after a rollback", layout);
    llamavid_sampler_free(smp);
    llamavid_session_free(s);
    llamavid_model_free(m);
    CHECK(toy.contexts == 0, "every context closed, %d open", toy.contexts);
}

static int count_tokens(void *user, int32_t token) { (void)token; ++*(int *)user; return 0; }

static void test_no_allocation_per_token(void) {
    write_manifest("shared", 0, NULL, NULL);
    llamavid_model *m = open_model();
    llamavid_session *s = NULL;
    llamavid_sampler *smp = NULL;
    llamavid_sampler_params sp = {0.8f, 5, 0.9f, 1.3f, 7};
    OK(llamavid_session_create(m, NULL, &s));
    OK(llamavid_sampler_create(&sp, V, &smp));
    const int32_t ids[] = {BOS, IMAGE, 9};
    llamavid_prompt p = video_prompt(ids, 3, 4);
    int32_t t, seen = 0;
    OK(llamavid_session_prompt(s, &p));
    OK(llamavid_session_next(s, smp, &t));                /* warm-up */
    long before = n_alloc;
    for (int k = 0; k < 30 && t != EOS; k++) OK(llamavid_session_next(s, smp, &t));
    CHECK(n_alloc == before, "heap allocations in 30 next() calls: %ld", n_alloc - before);
    llamavid_session_reset(s);
    OK(llamavid_session_prompt(s, &p));
    before = n_alloc;
    int32_t n = 0;
    OK(llamavid_session_generate(s, smp, 20, count_tokens, &seen, &n));
    CHECK(n_alloc == before && n == seen, "generate: %ld allocations, %d tokens, %d seen", n_alloc - before, n, seen);
    llamavid_sampler_free(smp);
    llamavid_session_free(s);
    llamavid_model_free(m);
}

static void test_errors(void) {
    write_manifest("shared", 0, NULL, NULL);
    llamavid_model *m = open_model();
    llamavid_session *s = NULL;
    llamavid_sampler *smp = NULL;
    llamavid_sampler_params gp = llamavid_sampler_default_params();
    OK(llamavid_sampler_create(&gp, V, &smp));
    int32_t t;
    /* NULL handles and arguments */
    FAILS(llamavid_session_create(NULL, NULL, &s), LLAMAVID_ERR_ARGUMENT, "expected an open model, found NULL");
    FAILS(llamavid_session_prompt(NULL, NULL), LLAMAVID_ERR_ARGUMENT, "expected a live session, found NULL");
    FAILS(llamavid_session_next(NULL, smp, &t), LLAMAVID_ERR_ARGUMENT, "found NULL");
    FAILS(llamavid_model_get_info(NULL, NULL), LLAMAVID_ERR_ARGUMENT, "a NULL model");
    llamavid_session_params big = {CTX + 1, 0, 0};
    FAILS(llamavid_session_create(m, &big, &s), LLAMAVID_ERR_ARGUMENT, "0 <= n_ctx <= 64");
    OK(llamavid_session_create(m, NULL, &s));
    FAILS(llamavid_session_next(s, NULL, &t), LLAMAVID_ERR_ARGUMENT, "expected a live sampler");
    FAILS(llamavid_session_next(s, smp, &t), LLAMAVID_ERR_STATE, "prompt the session first");
    /* prompts that are wrong or do not fit */
    const int32_t bad_id[] = {BOS, V + 3}, two[] = {BOS, IMAGE, IMAGE}, text[] = {BOS, 5};
    llamavid_prompt p = {.ids = bad_id, .n_ids = 2};
    FAILS(llamavid_session_prompt(s, &p), LLAMAVID_ERR_ARGUMENT, "token 1: expected an id in [0, 40)");
    p = video_prompt(text, 2, 2);
    FAILS(llamavid_session_prompt(s, &p), LLAMAVID_ERR_ARGUMENT, "found 0 placeholder(s), 2 frame(s)");
    p = video_prompt(two, 3, 2);
    FAILS(llamavid_session_prompt(s, &p), LLAMAVID_ERR_ARGUMENT, "expected image_counts for 2 image placeholders");
    const int32_t counts[] = {1, 2};
    p.image_counts = counts;
    FAILS(llamavid_session_prompt(s, &p), LLAMAVID_ERR_ARGUMENT, "image_counts sum to 3, expected the 2 frames");
    p = video_prompt(two + 1, 1, 2);
    p.qformer_ids = NULL;
    FAILS(llamavid_session_prompt(s, &p), LLAMAVID_ERR_ARGUMENT, "Q-Former ids and mask");
    p = video_prompt(two + 1, 1, 40);        /* 80 visual positions > 64 */
    static float many[40][3 * S * S];
    p.pixels = many[0];
    FAILS(llamavid_session_prompt(s, &p), LLAMAVID_ERR_CAPACITY, "the prompt needs 80 positions after the 0 held, the session holds 64");
    CHECK(llamavid_session_position(s) == 0, "nothing ran for a prompt that does not fit");
    /* a backend that returns a wrong shape, then a wrong dtype; the session is reset and reused */
    const int32_t ids[] = {BOS, IMAGE, 9};
    p = video_prompt(ids, 3, 2);
    toy.wrong_head_shape = 1;
    FAILS(llamavid_session_prompt(s, &p), LLAMAVID_ERR_SHAPE, "stage head (head.onnx fp32 on toy): output frame_tokens: "
          "expected float32 [2,2,8], found float32 [2,3,8]");
    toy.wrong_head_shape = 0;
    toy.wrong_logits_dtype = 1;
    llamavid_session_reset(s);
    FAILS(llamavid_session_prompt(s, &p), LLAMAVID_ERR_SHAPE, "output logits: expected float32 [1,1,40], found float16 [1,1,40]");
    toy.wrong_logits_dtype = 0;
    /* a stage that fails in the middle of an answer: the position stays at the last complete entry */
    llamavid_session_reset(s);
    OK(llamavid_session_prompt(s, &p));
    int pos = llamavid_session_position(s);
    toy.llm_calls = 0;
    toy.fail_llm_at = 3;
    OK(llamavid_session_next(s, smp, &t));
    OK(llamavid_session_next(s, smp, &t));
    OK(llamavid_session_next(s, smp, &t));
    FAILS(llamavid_session_next(s, smp, &t), LLAMAVID_ERR_BACKEND, "stage llm (llm/decoder.onnx fp32 on toy): toy: device lost");
    CHECK(llamavid_session_position(s) == pos + 2, "position after the failed step: %d, expected %d",
          llamavid_session_position(s), pos + 2);
    toy.fail_llm_at = 0;
    OK(llamavid_session_next(s, smp, &t));               /* retried: the pending token goes in */
    CHECK(llamavid_session_position(s) == pos + 3, "the retry appended the pending token");
    llamavid_session_reset(s);
    OK(llamavid_session_prompt(s, &p));
    CHECK(llamavid_session_position(s) == pos, "reused after reset");
    /* the KV cache overflows while generating: next() gives -1 */
    llamavid_session_params small = {pos + 2, 0, 0};
    llamavid_session *s2 = NULL;
    OK(llamavid_session_create(m, &small, &s2));
    OK(llamavid_session_prompt(s2, &p));
    int32_t got[5], n = 0;
    for (; n < 5; n++) {
        OK(llamavid_session_next(s2, smp, &got[n]));
        if (got[n] < 0 || got[n] == EOS) break;
    }
    CHECK(n == 3 && got[3] == -1 && llamavid_session_position(s2) == pos + 2,
          "a cache of %d positions: 3 tokens then -1, found %d tokens", pos + 2, n);
    FAILS(llamavid_session_rollback(s2, pos + 3), LLAMAVID_ERR_ARGUMENT, "expected a position in [0, 8], found 9");
    llamavid_session_free(s2);
    /* stop tokens: none (the answer goes on to max_new_tokens), or the first greedy token */
    int32_t stop[17] = {0};
    FAILS(llamavid_session_set_stop(s, stop, 17), LLAMAVID_ERR_ARGUMENT, "expected 0 to 16 ids, found 17");
    llamavid_session_reset(s);
    OK(llamavid_session_prompt(s, &p));
    OK(llamavid_session_next(s, smp, &t));
    stop[0] = t;
    llamavid_session_reset(s);
    OK(llamavid_session_set_stop(s, stop, 1));
    OK(llamavid_session_prompt(s, &p));
    OK(llamavid_session_generate(s, smp, 10, NULL, NULL, &n));
    CHECK(n == 0 && llamavid_session_logits(s) == NULL, "a stop token first: no tokens, the answer over (%d)", n);
    OK(llamavid_session_set_stop(s, NULL, 0));
    llamavid_session_reset(s);
    OK(llamavid_session_prompt(s, &p));
    OK(llamavid_session_generate(s, smp, 10, NULL, NULL, &n));
    CHECK(n == 10, "no stop tokens: max_new_tokens tokens (%d)", n);
    llamavid_session_free(s);
    llamavid_sampler_free(smp);
    /* no backend runs a stage */
    toy.refuse_all = 1;
    const llamavid_backend *b[] = {&TOY};
    llamavid_model_params mp = {b, 1, 0, NULL};
    llamavid_model *none = NULL;
    FAILS(llamavid_model_open(dir, &mp, &none), LLAMAVID_ERR_BACKEND, "stage vision: expected a backend that runs one of "
          "its variants [vision.onnx fp32 (ort-cpu)], found backends [toy]");
    toy.refuse_all = 0;
    llamavid_model_free(m);
}

static void test_bad_manifests(void) {
    const llamavid_backend *b[] = {&TOY};
    llamavid_model_params mp = {b, 1, 0, NULL};
    llamavid_model *m = NULL;
    static const struct { const char *from, *to, *part; int code; } cases[] = {
        {"\"manifest_version\": 3", "\"manifest_version\": 2", "expected format 'llamavid-artifacts' version 3, found "
         "the string \"llamavid-artifacts\" version 2", LLAMAVID_ERR_MANIFEST},
        {"\"eos\": 2", "\"eos\": \"2\"", "special_ids.eos: expected an integer in [0, 39], found the string \"2\"",
         LLAMAVID_ERR_MANIFEST},
        {"\"layers\": 2", "\"layers\": 1e9", "llm.layers: expected an integer in [1, 1024], found 1000000000",
         LLAMAVID_ERR_MANIFEST},
        {"\"file\": \"vision.onnx\"", "\"file\": \"../vision.onnx\"", "an empty or '..' component", LLAMAVID_ERR_MANIFEST},
        {"\"file\": \"vision.onnx\"", "\"file\": \"/etc/passwd\"", "found \"/etc/passwd\" (absolute)", LLAMAVID_ERR_MANIFEST},
        {"\"file\": \"vision.onnx\"", "\"file\": \"other.onnx\"", "names other.onnx, which has no entry in 'files'",
         LLAMAVID_ERR_MANIFEST},
        {"\"embeddings\": \"embed.npy\"", "\"embeddings\": \"missing.npy\"", "llm.embeddings names missing.npy",
         LLAMAVID_ERR_MANIFEST},
        {"\"head.onnx\": \"" HASH "\"", "\"head.onnx\": 7", "files[\"head.onnx\"]: expected a sha256", LLAMAVID_ERR_MANIFEST},
        {"\"kv_layout\": \"shared\"", "\"kv_layout\": \"paged\"", "llm.kv_layout: expected \"shared\" or \"concat\"",
         LLAMAVID_ERR_MANIFEST},
        {"\"frame_tokens\": {\"shape\": [\"frames\", 2, 8]", "\"frame_tokens\": {\"shape\": [\"frames\", 3, 8]",
         "stages.head.outputs.frame_tokens: expected float32 [-1,2,8]", LLAMAVID_ERR_MANIFEST},
        {"\"std\": [0.25, 0.25, 0.5]", "\"std\": [0.25, 0, 0.5]", "preprocess.std.1: expected a number in [1e-06, 1000], found 0",
         LLAMAVID_ERR_MANIFEST},
        {"{\"format\"", "[{\"format\"", "expected JSON, found a parse error (line ", LLAMAVID_ERR_MANIFEST},
    };
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        write_manifest("shared", 0, cases[k].from, cases[k].to);
        FAILS(llamavid_model_open(dir, &mp, &m), (llamavid_code)cases[k].code, cases[k].part);
        CHECK(m == NULL, "no model for a refused manifest");
    }
    /* a stage file that resolves outside the directory through a symlink */
    write_manifest("shared", 0, NULL, NULL);
    char link[512];
    snprintf(link, sizeof link, "%s/head.onnx", dir);
    unlink(link);
    CHECK(symlink("/etc/hostname", link) == 0, "symlink");
    FAILS(llamavid_model_open(dir, &mp, &m), LLAMAVID_ERR_MANIFEST, "expected a file inside the directory");
    unlink(link);
    write_file("head.onnx", "h", 1);
    /* hashes: the zeros in the manifest are not the files' */
    mp.verify_hashes = 1;
    FAILS(llamavid_model_open(dir, &mp, &m), LLAMAVID_ERR_MANIFEST, "was modified: expected sha256 0000");
    FAILS(llamavid_model_open("/nonexistent/dir", &mp, &m), LLAMAVID_ERR_MANIFEST, "expected manifest.json");
}

static void test_sampler(void) {
    float l[V];
    for (int v = 0; v < V; v++) l[v] = (float)((v * 11) % 7) * 0.5f;          /* max 3.0 at v = 4, 11, 18 ... */
    llamavid_sampler *s = NULL;
    llamavid_sampler_params p = llamavid_sampler_default_params();
    OK(llamavid_sampler_create(&p, V, &s));
    CHECK(llamavid_sampler_sample(s, l, NULL, 0) == 5, "greedy: the lowest id among the maxima, found %d",
          llamavid_sampler_sample(s, l, NULL, 0));
    int32_t hist[] = {5, 5, 12};
    llamavid_sampler_free(s);
    p.repetition_penalty = 2.0f;
    OK(llamavid_sampler_create(&p, V, &s));
    CHECK(llamavid_sampler_sample(s, l, hist, 3) == 19, "repetition penalty moves greedy past 5 and 12, found %d",
          llamavid_sampler_sample(s, l, hist, 3));
    llamavid_sampler_free(s);
    /* top_k 1 and a tiny top_p are greedy whatever the seed; temperature sampling follows softmax */
    p = (llamavid_sampler_params){1.0f, 1, 1.0f, 1.0f, 3};
    OK(llamavid_sampler_create(&p, V, &s));
    CHECK(llamavid_sampler_sample(s, l, NULL, 0) == 5, "top_k 1 is greedy");
    llamavid_sampler_free(s);
    p = (llamavid_sampler_params){1.0f, 0, 1e-6f, 1.0f, 3};
    OK(llamavid_sampler_create(&p, V, &s));
    CHECK(llamavid_sampler_sample(s, l, NULL, 0) == 5, "top_p 1e-6 is greedy");
    llamavid_sampler_free(s);
    float two[V];
    for (int v = 0; v < V; v++) two[v] = v == 3 ? logf(3.0f) : v == 8 ? 0.0f : -1e30f;   /* p(3) = 0.75, p(8) = 0.25 */
    p = (llamavid_sampler_params){1.0f, 0, 1.0f, 1.0f, 11};
    OK(llamavid_sampler_create(&p, V, &s));
    int n3 = 0;
    for (int k = 0; k < 4000; k++) n3 += llamavid_sampler_sample(s, two, NULL, 0) == 3;
    CHECK(n3 > 2880 && n3 < 3120, "p(3) = 0.75 over 4000 draws: %d", n3);
    llamavid_sampler_reset(s, 11);
    int a = llamavid_sampler_sample(s, l, NULL, 0);
    llamavid_sampler_reset(s, 11);
    CHECK(llamavid_sampler_sample(s, l, NULL, 0) == a, "reset to the same seed repeats the draw");
    llamavid_sampler_free(s);
    FAILS(llamavid_sampler_create(&(llamavid_sampler_params){1.0f, -1, 1.0f, 1.0f, 0}, V, &s), LLAMAVID_ERR_ARGUMENT,
          "top_k >= 0");
    /* RNG: splitmix64's first output from seed 0 is the published 0xe220a8397b1dcdaf; doubles lie in [0,1) */
    double u[1000];
    llamavid_rng_doubles(0, u, 1000);
    double mean = 0;
    for (int k = 0; k < 1000; k++) { CHECK(u[k] >= 0 && u[k] < 1, "u in [0,1)"); mean += u[k] / 1000; }
    CHECK(fabs(mean - 0.5) < 0.03, "mean of 1000 doubles %f", mean);
}

/* the manifest's zero hash of `name` replaced by what sha256sum (an independent implementation) prints */
static void set_real_hash(const char *name) {
    char cmd[600], hex[65] = "", path[512], from[200], to[200];
    snprintf(cmd, sizeof cmd, "sha256sum '%s/%s'", dir, name);
    FILE *f = popen(cmd, "r");
    CHECK(f && fscanf(f, "%64s", hex) == 1, "sha256sum %s", name);
    if (f) pclose(f);
    snprintf(path, sizeof path, "%s/manifest.json", dir);
    static char m[16384], t[16384];
    FILE *in = fopen(path, "rb");
    size_t n = fread(m, 1, sizeof m - 1, in);
    fclose(in);
    m[n] = 0;
    snprintf(from, sizeof from, "\"%s\": \"" HASH "\"", name);
    snprintf(to, sizeof to, "\"%s\": \"%s\"", name, hex);
    char *at = strstr(m, from);
    CHECK(at != NULL, "files entry of %s", name);
    if (!at) return;
    snprintf(t, sizeof t, "%.*s%s%s", (int)(at - m), m, to, at + strlen(from));
    write_file("manifest.json", t, strlen(t));
}

static void test_evict(const char *layout) {
    write_manifest(layout, 0, NULL, NULL);
    llamavid_model *m = open_model();
    llamavid_session *s = NULL;
    OK(llamavid_session_create(m, NULL, &s));
    int32_t ids[20];
    n_want = 0;
    for (int k = 0; k < 20; k++) want_text(ids[k] = 3 + (k * 7) % 30);
    llamavid_prompt p = {.ids = ids, .n_ids = 20};
    OK(llamavid_session_prompt(s, &p));
    FAILS(llamavid_session_evict(s, 15, 6), LLAMAVID_ERR_ARGUMENT, "expected a range inside [0, 20), found start 15, 6");
    OK(llamavid_session_evict(s, 5, 6));
    want_evict(5, 6);
    CHECK(llamavid_session_position(s) == 14 && !llamavid_session_logits(s), "%s: 14 positions after evicting 6", layout);
    OK(llamavid_session_evict(s, 2, 3));                 /* twice: the shifts add up */
    want_evict(2, 3);
    p = (llamavid_prompt){.ids = ids, .n_ids = 1};
    OK(llamavid_session_prompt(s, &p));
    want_text(ids[0]);
    float want[V];
    want_logits(want);
    CHECK(close_logits(llamavid_session_logits(s), want), "%s: logits after evictions: the moved keys re-rotated", layout);
    llamavid_session_free(s);
    llamavid_model_free(m);
}

/* a stream: chunks, the focus tier replacing the last frames' warm copies, answers, eviction */
static void test_stream(void) {
    write_manifest("shared", 0, NULL, NULL);
    llamavid_model *m = open_model();
    llamavid_stream *st = NULL;
    const int32_t prefix[] = {BOS, 7};
    const int64_t ingest[1][2] = {{4, 6}}, imask[1][2] = {{1, 1}};     /* q = 10 */
    llamavid_stream_params sp = llamavid_stream_default_params();
    sp.prefix_ids = prefix, sp.n_prefix = 2, sp.ingest_qformer_ids = ingest[0], sp.ingest_qformer_mask = imask[0];
    sp.n_ingest = 2, sp.focus_frames = 2, sp.reserve = 4, sp.evict_frames = 2;
    FAILS(llamavid_stream_create(m, &(llamavid_stream_params){.n_ingest = 0}, &st), LLAMAVID_ERR_ARGUMENT, "ingest");
    OK(llamavid_stream_create(m, &sp, &st));
    for (int f = 0; f < 10; f++) OK(llamavid_stream_push(st, pixels[f], f, NULL, 0));
    FAILS(llamavid_stream_push(st, pixels[0], 8.5, NULL, 0), LLAMAVID_ERR_ARGUMENT, "expected a time >= 9.000 s");
    llamavid_stream_info info;
    OK(llamavid_stream_get_info(st, &info));
    CHECK(info.frames_pushed == 10 && info.frames_encoded == 9 && info.frames_pending == 1 && info.position == 20,
          "chunks of 3: 9 frames encoded, 1 pending, 20 positions (%lld, %lld, %d, %d)", (long long)info.frames_encoded,
          (long long)info.frames_pushed, info.frames_pending, info.position);
    const int32_t qids[] = {9, 10};
    llamavid_question q = {qids, 2, QIDS[0], QMASK[0], 3};
    OK(llamavid_stream_begin(st, &q));
    FAILS(llamavid_stream_begin(st, &q), LLAMAVID_ERR_STATE, "one question at a time");
    n_want = 0;
    want_text(BOS); want_text(7);
    for (int f = 0; f < 10; f++) want_frame(pixels[f], f < 8 ? 10 : 14);   /* the last 2 with the question */
    want_text(9); want_text(10);
    float want[V];
    want_logits(want);
    llamavid_session *s = llamavid_stream_session(st);
    CHECK(close_logits(llamavid_session_logits(s), want), "stream: focus frames replace their warm copies");
    OK(llamavid_stream_push(st, pixels[0], 10, NULL, 0));               /* buffered while the question is open */
    llamavid_sampler *smp = NULL;
    llamavid_sampler_params gp = llamavid_sampler_default_params();
    OK(llamavid_sampler_create(&gp, V, &smp));
    int32_t first[4], again[4], n;
    for (int k = 0; k < 4; k++) OK(llamavid_session_next(s, smp, &first[k]));
    OK(llamavid_stream_end(st));
    OK(llamavid_stream_get_info(st, &info));
    CHECK(info.position == 22 && info.frames_pending == 1, "back to the warm tier: 22 positions, 1 frame waiting (%d)",
          info.position);
    OK(llamavid_stream_flush(st));
    OK(llamavid_stream_ask(st, &q, smp, 4, NULL, NULL, &n));
    OK(llamavid_stream_get_info(st, &info));
    CHECK(info.position == 24 && n == 4, "ask: 4 tokens, the warm tier back at 24 positions (%d)", info.position);
    /* the window: 64 positions - reserve 4; frames evicted two or more at a time, the prefix kept */
    for (int f = 11; f < 60; f++) OK(llamavid_stream_push(st, pixels[f % 10], f, NULL, 0));
    OK(llamavid_stream_flush(st));
    OK(llamavid_stream_get_info(st, &info));
    CHECK(info.position <= 60 && info.frames_evicted > 0 && info.frames_held * 2 + 2 == info.position &&
          info.last_time == 59 && info.first_time == 60 - info.frames_held, "window: %d positions, %d held from t=%g, %lld "
          "evicted", info.position, info.frames_held, info.first_time, (long long)info.frames_evicted);
    OK(llamavid_stream_begin(st, &q));
    for (int k = 0; k < 2; k++) OK(llamavid_session_next(s, smp, &again[k]));
    OK(llamavid_stream_end(st));
    /* putting the warm copies back fails: the two focus frames are dropped, the stream goes on without focus
     * until new frames arrive */
    OK(llamavid_stream_get_info(st, &info));
    int held = info.frames_held, pos = info.position;
    toy.llm_calls = 0;
    toy.fail_llm_at = 2;
    OK(llamavid_stream_begin(st, &q));
    FAILS(llamavid_stream_end(st), LLAMAVID_ERR_BACKEND, "toy: device lost");
    toy.fail_llm_at = 0;
    OK(llamavid_stream_get_info(st, &info));
    CHECK(info.frames_held == held - 2 && info.position == pos - 4, "after a failed restore: %d frames, %d positions",
          info.frames_held, info.position);
    OK(llamavid_stream_ask(st, &q, smp, 2, NULL, NULL, &n));
    OK(llamavid_stream_get_info(st, &info));
    CHECK(info.position == pos - 4, "a question without focus frames leaves the cache as it was (%d)", info.position);
    for (int f = 60; f < 66; f++) OK(llamavid_stream_push(st, pixels[f % 10], f, NULL, 0));
    OK(llamavid_stream_flush(st));
    OK(llamavid_stream_ask(st, &q, smp, 2, NULL, NULL, &n));         /* new frames: the focus tier again */
    llamavid_sampler_free(smp);
    llamavid_stream_free(st);
    llamavid_model_free(m);
    (void)first;
}

static void test_hashes(void) {
    const char *names[] = {"vision.onnx", "head.onnx", "llm/decoder.onnx", "llm/prefill.onnx", "embed.npy"};
    write_manifest("shared", 0, NULL, NULL);
    for (int k = 0; k < 5; k++) set_real_hash(names[k]);
    const llamavid_backend *b[] = {&TOY};
    llamavid_model_params mp = {b, 1, 1, NULL};
    llamavid_model *m = NULL;
    OK(llamavid_model_open(dir, &mp, &m));               /* every sha256 agrees with sha256sum's */
    llamavid_model_free(m);
    m = NULL;
    /* the manifest's own hash, as the caller checked it (sha256sum of manifest.json), then a wrong one */
    char cmd[600], hex[65] = "";
    snprintf(cmd, sizeof cmd, "sha256sum '%s/manifest.json'", dir);
    FILE *f = popen(cmd, "r");
    CHECK(f && fscanf(f, "%64s", hex) == 1, "sha256sum manifest.json");
    if (f) pclose(f);
    mp.manifest_sha256 = hex;
    OK(llamavid_model_open(dir, &mp, &m));
    llamavid_model_free(m);
    m = NULL;
    mp.manifest_sha256 = HASH;
    FAILS(llamavid_model_open(dir, &mp, &m), LLAMAVID_ERR_MANIFEST, "expected sha256 0000000000000000000000000000000000000000000000000000000000000000 (the manifest the caller checked or pinned), found ");
    mp.manifest_sha256 = NULL;
    write_file("head.onnx", "H", 1);
    FAILS(llamavid_model_open(dir, &mp, &m), LLAMAVID_ERR_MANIFEST, "file head.onnx was modified: expected sha256 aaa9402664f1a41f40ebbc52c9993eb66aeb366602958fdfaa283b71e64db123, found ");
    write_file("head.onnx", "h", 1);
}

int main(void) {
    make_dir();
    fill_pixels();
    test_sampler();
    for (int prefill = 0; prefill < 2; prefill++) {
        test_prompt_layout("shared", prefill, 0);
        test_prompt_layout("concat", prefill, 0);
        test_prompt_layout("shared", prefill, 5);    /* the prompt in chunks of 5 rows */
        test_prompt_layout("concat", prefill, 7);
    }
    test_evict("shared");
    test_evict("concat");
    test_stream();
    test_no_allocation_per_token();
    test_errors();
    test_bad_manifests();
    test_hashes();
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    if (system(cmd) != 0) printf("could not remove %s\n", dir);
    printf("%d checks, %d failures\n", checks, failures);
    return failures ? 1 : 0;
}
