/* ask.c -- ask LLaMA-VID about RGB frames through the C API (llamavid.h); the answer's token ids are printed as they
 * come, through the generation callback. README.md says how to build and run it.
 *
 *   ask ARTIFACTS IDS_FILE (FRAMES.rgb | --synthetic N) [--backend LIBRARY [--option KEY=VALUE]...]...
 *       [--max-new-tokens N]
 *
 *   IDS_FILE    two lines of ids (ids.py writes them; tokenizing stays outside the core): the prompt's LLM ids with the
 *               image id (-200) where the frames go, then the question's Q-Former ids
 *   FRAMES.rgb  raw uint8 RGB frames [F,S,S,3] at the model's image size S; --synthetic N: N made-up frames. Each is
 *               normalised here with the manifest's mean and std into pixel values [F,3,S,S] float32
 *   --backend   a backend library for llamavid_backend_load (e.g. the TensorRT backend); --option KEY=VALUE pairs
 *               after it are its options
 *
 * Every stage needs a C-callable backend: the TensorRT backend runs the vision and head engines, and the LLM needs one
 * too (an engine of the LLM, or an ONNX Runtime C backend). Without one, llamavid_model_open names the stage.
 */
#define _POSIX_C_SOURCE 200809L
#include "llamavid.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_BACKENDS 4
#define MAX_OPTIONS 16

typedef struct {
    const char *path, *keys[MAX_OPTIONS], *values[MAX_OPTIONS];
    int n;
} backend_arg;

static int report(llamavid_error *e) {
    fprintf(stderr, "ask: %s\n", llamavid_error_message(e));
    llamavid_error_free(e);
    return 1;
}

/* The ids of the next line of f into *out (grown with realloc); the count, or -1 at the end of the file. */
static int read_ids(FILE *f, int64_t **out) {
    char *line = NULL, *p, *end;
    size_t cap = 0;
    int n = 0;
    if (getline(&line, &cap, f) < 0) { free(line); return -1; }
    for (p = line;; p = end) {
        long long v = strtoll(p, &end, 10);
        if (end == p) break;
        int64_t *grown = realloc(*out, (size_t)(n + 1) * sizeof **out);
        if (!grown) { n = -1; break; }
        *out = grown;
        (*out)[n++] = v;
    }
    free(line);
    return n;
}

/* The bytes of a file (NULL if it cannot be read) and their count. */
static unsigned char *read_file(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    long size = f && fseek(f, 0, SEEK_END) == 0 ? ftell(f) : -1;
    unsigned char *data = size > 0 && fseek(f, 0, SEEK_SET) == 0 ? malloc((size_t)size) : NULL;
    if (data && fread(data, 1, (size_t)size, f) != (size_t)size) { free(data); data = NULL; }
    if (f) fclose(f);
    *n = data ? (size_t)size : 0;
    return data;
}

/* Frames [F,S,S,3] uint8 from a file (F from its size) or made up (F = synthetic) -> pixel values [F,3,S,S]. */
static float *pixels(const char *file, int synthetic, const llamavid_model_info *m, int *frames) {
    const size_t S = (size_t)m->image_size, frame = S * S * 3;
    size_t bytes = (size_t)synthetic * frame;
    unsigned char *rgb = file ? read_file(file, &bytes) : malloc(bytes);
    if (file && (!rgb || bytes % frame)) {
        fprintf(stderr, "ask: %s: expected raw RGB frames of %zux%zu pixels (a multiple of %zu bytes)\n", file, S, S, frame);
        free(rgb);
        return NULL;
    }
    for (size_t i = 0; !file && rgb && i < bytes; i++)   /* a diagonal gradient that moves with the frame */
        rgb[i] = (unsigned char)((i / 3 % S + i / 3 / S % S + 16 * (i / frame) + 80 * (i % 3)) % 256);
    *frames = (int)(bytes / frame);
    float *px = rgb ? malloc(bytes * sizeof *px) : NULL;
    for (size_t i = 0; px && i < bytes; i++) {         /* i walks [F,S,S,3], px is [F,3,S,S] */
        size_t c = i % 3, yx = i / 3 % (S * S), f = i / frame;
        px[(f * 3 + c) * S * S + yx] = ((float)rgb[i] / 255.0f - m->mean[c]) / m->std[c];
    }
    free(rgb);
    return px;
}

static int on_token(void *user, int32_t token) {
    (void)user;
    printf("%d ", token);
    fflush(stdout);
    return 0;
}

int main(int argc, char **argv) {
    backend_arg args[MAX_BACKENDS];
    int n_backends = 0, synthetic = 0, max_new = 64, frames = 0, rc = 1;
    const char *frames_file = NULL;
    for (int i = 3; i < argc; i++) {
        const char *next = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(argv[i], "--synthetic") && next) synthetic = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--max-new-tokens") && next) max_new = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--backend") && next && n_backends < MAX_BACKENDS)
            args[n_backends++] = (backend_arg){.path = argv[++i]};
        else if (!strcmp(argv[i], "--option") && next && strchr(next, '=') && n_backends &&
                 args[n_backends - 1].n < MAX_OPTIONS) {
            backend_arg *b = &args[n_backends - 1];
            *strchr(argv[++i], '=') = 0;
            b->keys[b->n] = argv[i];
            b->values[b->n++] = argv[i] + strlen(argv[i]) + 1;
        } else if (argv[i][0] != '-' && !frames_file) frames_file = argv[i];
        else { argc = 0; break; }
    }
    if (argc < 3 || (!frames_file) == (synthetic <= 0)) {
        fprintf(stderr, "usage: ask ARTIFACTS IDS_FILE (FRAMES.rgb | --synthetic N) [--backend LIBRARY [--option "
                        "KEY=VALUE]...]... [--max-new-tokens N]\n");
        return 2;
    }
    llamavid_backend *backends[MAX_BACKENDS] = {0};
    llamavid_model *model = NULL;
    llamavid_session *session = NULL;
    llamavid_sampler *sampler = NULL;
    llamavid_model_info info;
    int64_t *ids = NULL, *qformer = NULL, *mask = NULL;
    int32_t *prompt_ids = NULL;
    float *px = NULL;
    llamavid_error *e = NULL;
    FILE *f = fopen(argv[2], "r");
    int n_ids = f ? read_ids(f, &ids) : -1, n_q = f ? read_ids(f, &qformer) : -1;
    if (f) fclose(f);
    if (n_ids < 1 || n_q < 1) {
        fprintf(stderr, "ask: %s: expected two lines of ids (the prompt's, then the question's Q-Former ids)\n", argv[2]);
        goto done;
    }
    for (int b = 0; b < n_backends && !e; b++)
        e = llamavid_backend_load(args[b].path, args[b].keys, args[b].values, args[b].n, &backends[b]);
    llamavid_model_params mp = llamavid_model_default_params();
    mp.backends = (const llamavid_backend *const *)backends;
    mp.n_backends = n_backends;
    if (e || (e = llamavid_model_open(argv[1], &mp, &model)) || (e = llamavid_model_get_info(model, &info))) goto done;
    if (!(px = pixels(frames_file, synthetic, &info, &frames))) goto done;
    mask = malloc((size_t)n_q * sizeof *mask);
    prompt_ids = malloc((size_t)n_ids * sizeof *prompt_ids);
    if (!mask || !prompt_ids) goto done;
    for (int k = 0; k < n_q; k++) mask[k] = 1;
    for (int k = 0; k < n_ids; k++) prompt_ids[k] = (int32_t)ids[k];
    llamavid_prompt prompt = {.ids = prompt_ids, .n_ids = n_ids, .pixels = px, .n_frames = frames,
                              .qformer_ids = qformer, .qformer_mask = mask, .n_qformer = n_q};
    int32_t positions = frames * info.tokens_per_frame + max_new;       /* the KV cache this answer needs */
    for (int k = 0; k < n_ids; k++) positions += prompt_ids[k] != info.image_id;
    llamavid_session_params cache = {positions < info.context ? positions : info.context, 0, 0};
    llamavid_sampler_params sp = llamavid_sampler_default_params();   /* greedy */
    if ((e = llamavid_session_create(model, &cache, &session)) ||
        (e = llamavid_sampler_create(&sp, info.vocab_size, &sampler)) || (e = llamavid_session_prompt(session, &prompt)) ||
        (e = llamavid_session_generate(session, sampler, max_new, on_token, NULL, NULL)))
        goto done;
    printf("\n");
    rc = 0;
done:
    if (e) rc = report(e);
    llamavid_sampler_free(sampler);
    llamavid_session_free(session);
    llamavid_model_free(model);
    for (int b = 0; b < n_backends; b++) llamavid_backend_unload(backends[b]);
    free(ids); free(qformer); free(mask); free(prompt_ids); free(px);
    return rc;
}
