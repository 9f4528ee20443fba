/* model.c -- llamavid_model: Config (config.c) + Stages, each opened once on the first backend that runs one
 * of its variants, shared read-only by every session. */
#define _DEFAULT_SOURCE
#include "internal.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

llamavid_model_params llamavid_model_default_params(void) {
    llamavid_model_params p = {NULL, 0, 1, NULL};
    return p;
}

/* Stage k's variants: vision/head/llm take those without a role, llm_prefill the llm's "prefill" ones. */
static llamavid_error *open_stage(llamavid_model *m, const char *dir, const llamavid_model_params *p, int k) {
    int s = k == ST_PREFILL ? ST_LLM : k;
    const char *role = k == ST_PREFILL ? "prefill" : "";
    char tried[1024] = "";
    for (int32_t b = 0; b < p->n_backends; b++) {
        const llamavid_backend *be = p->backends[b];
        for (int32_t i = 0; i < m->cfg.n_variants[s]; i++) {
            const variant_spec *v = &m->cfg.variants[s][i];
            if (strcmp(v->role, role) != 0) continue;
            char path[PATH_MAX];
            snprintf(path, sizeof path, "%s/%s", dir, v->file);
            const stage_spec *io = &m->cfg.io[s];
            llamavid_variant var = {v->stage, v->role, v->backend, v->precision, v->file, path, v->index,
                                    io->in_t, io->n_in, io->out_t, io->n_out, v->built_with};
            void *handle = NULL;
            llamavid_error *e = be->open_stage(be->user, &var, &handle);
            if (e) {
                char prefix[700];
                snprintf(prefix, sizeof prefix, "stage %s: %s (%s) on backend %s", STAGE_KEYS[k], v->file,
                         v->backend, be->name);
                return error_wrap(e, LLAMAVID_ERR_BACKEND, prefix);
            }
            if (handle) {
                m->stages[k] = (stage){be, handle, ""};
                snprintf(m->stages[k].desc, sizeof m->stages[k].desc, "%s %s on %s", v->file, v->precision, be->name);
                return NULL;
            }
        }
    }
    if (k == ST_PREFILL) return NULL;   /* optional */
    for (int32_t i = 0; i < m->cfg.n_variants[s]; i++)
        if (!m->cfg.variants[s][i].role[0])
            snprintf(tried + strlen(tried), sizeof tried - strlen(tried), "%s%s %s (%s)", strlen(tried) ? ", " : "",
                     m->cfg.variants[s][i].file, m->cfg.variants[s][i].precision, m->cfg.variants[s][i].backend);
    char have[256] = "";
    for (int32_t b = 0; b < p->n_backends; b++)
        snprintf(have + strlen(have), sizeof have - strlen(have), "%s%s", b ? ", " : "", p->backends[b]->name);
    return llamavid_error_new(LLAMAVID_ERR_BACKEND, "stage %s: expected a backend that runs one of its variants [%s], "
                              "found backends [%s] and none runs them", STAGE_KEYS[k], tried, have);
}

llamavid_error *llamavid_model_open(const char *dir, const llamavid_model_params *params, llamavid_model **out) {
    if (!out) return llamavid_error_new(LLAMAVID_ERR_ARGUMENT, "llamavid_model_open: out is NULL");
    *out = NULL;
    if (!dir || !params)
        return llamavid_error_new(LLAMAVID_ERR_ARGUMENT, "llamavid_model_open: expected a directory and params, found NULL");
    for (int32_t b = 0; b < params->n_backends; b++)
        if (!params->backends || !params->backends[b] || !params->backends[b]->open_stage || !params->backends[b]->run ||
            !params->backends[b]->close_stage || !params->backends[b]->name)
            return llamavid_error_new(LLAMAVID_ERR_ARGUMENT, "llamavid_model_open: backend %d: expected name, open_stage, "
                                      "run and close_stage, found NULL", b);
    llamavid_model *m = calloc(1, sizeof *m);
    if (!m) return llamavid_error_new(LLAMAVID_ERR_MEMORY, "llamavid_model_open: out of memory");
    m->magic = MAGIC_MODEL;
    llamavid_error *e = config_read(dir, params->verify_hashes, params->manifest_sha256, &m->cfg);
    if (!e) e = embed_table_open(dir, &m->cfg, &m->embed);
    for (int k = 0; !e && k < N_STAGES; k++)
        e = open_stage(m, dir, params, k);
    if (e) {
        llamavid_model_free(m);
        return e;
    }
    m->cfg.info.has_prefill = m->stages[ST_PREFILL].backend != NULL;
    *out = m;
    return NULL;
}

void llamavid_model_free(llamavid_model *m) {
    if (!m || m->magic != MAGIC_MODEL) return;
    for (int k = 0; k < N_STAGES; k++)
        if (m->stages[k].backend) m->stages[k].backend->close_stage(m->stages[k].handle);
    embed_table_close(&m->embed);
    config_free(&m->cfg);
    m->magic = MAGIC_FREED;
    free(m);
}

llamavid_error *llamavid_model_get_info(const llamavid_model *m, llamavid_model_info *info) {
    if (!m || m->magic != MAGIC_MODEL || !info)
        return llamavid_error_new(LLAMAVID_ERR_ARGUMENT, "llamavid_model_get_info: expected an open model and info, "
                                  "found %s", !m ? "a NULL model" : !info ? "NULL info" : "a freed or invalid model");
    *info = m->cfg.info;
    return NULL;
}

const char *llamavid_model_stage(const llamavid_model *m, const char *name) {
    if (!m || m->magic != MAGIC_MODEL || !name) return "";
    for (int k = 0; k < N_STAGES; k++)
        if (strcmp(name, STAGE_KEYS[k]) == 0) return m->stages[k].desc;
    return "";
}
