/* backend_library.c -- a backend from a shared library loaded by path (llamavid.h, "backends in shared libraries").
 *
 *   dlopen(path) --dlsym--> llamavid_backend_create / llamavid_backend_free --create(options)--> the library's table
 *   the caller gets a copy of that table inside a `loaded` record, so unloading finds the library's own table, its
 *   free function and the dlopen handle again.
 */
#define _DEFAULT_SOURCE
#include "internal.h"

#include <dlfcn.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>

#define MAGIC_LIBRARY 0x4c564c49u   /* "LVLI" */

typedef struct {
    llamavid_backend table;          /* first: what the caller holds */
    uint32_t magic;
    llamavid_backend *made;          /* the library's table */
    llamavid_backend_free_fn free_fn;
    void *dl;
} loaded;

llamavid_error *llamavid_backend_load(const char *path, const char *const *keys, const char *const *values, int32_t n,
                                      llamavid_backend **out) {
    if (!out) return llamavid_error_new(LLAMAVID_ERR_ARGUMENT, "llamavid_backend_load: out is NULL");
    *out = NULL;
    if (!path || n < 0 || (n > 0 && (!keys || !values)))
        return llamavid_error_new(LLAMAVID_ERR_ARGUMENT, "llamavid_backend_load: expected a path and n >= 0 options, "
                                  "found %s, n = %d%s", path ? path : "NULL", n,
                                  n > 0 && (!keys || !values) ? " and NULL keys or values" : "");
    void *dl = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!dl)
        return llamavid_error_new(LLAMAVID_ERR_IO, "backend library %s: expected a loadable shared library, found: %s",
                                  path, dlerror());
    llamavid_backend_create_fn create = (llamavid_backend_create_fn)dlsym(dl, LLAMAVID_BACKEND_CREATE);
    llamavid_backend_free_fn free_fn = (llamavid_backend_free_fn)dlsym(dl, LLAMAVID_BACKEND_FREE);
    if (!create || !free_fn) {
        dlclose(dl);
        return llamavid_error_new(LLAMAVID_ERR_ARGUMENT, "backend library %s: expected the C functions %s and %s, found "
                                  "%s missing", path, LLAMAVID_BACKEND_CREATE, LLAMAVID_BACKEND_FREE,
                                  !create ? LLAMAVID_BACKEND_CREATE : LLAMAVID_BACKEND_FREE);
    }
    loaded *l = calloc(1, sizeof *l);
    if (!l) {
        dlclose(dl);
        return llamavid_error_new(LLAMAVID_ERR_MEMORY, "backend library %s: out of memory", path);
    }
    llamavid_error *e = create(LLAMAVID_API_VERSION, llamavid_error_new, keys, values, n, &l->made);
    if (!e && !l->made)
        e = llamavid_error_new(LLAMAVID_ERR_BACKEND, "%s returned no backend and no error", LLAMAVID_BACKEND_CREATE);
    if (e) {
        free(l);
        dlclose(dl);
        char prefix[PATH_MAX + 32];
        snprintf(prefix, sizeof prefix, "backend library %s", path);
        return error_wrap(e, LLAMAVID_OK, prefix);
    }
    l->table = *l->made;
    l->magic = MAGIC_LIBRARY;
    l->free_fn = free_fn;
    l->dl = dl;
    *out = &l->table;
    return NULL;
}

void llamavid_backend_unload(llamavid_backend *backend) {
    loaded *l = (loaded *)backend;
    if (!l || l->magic != MAGIC_LIBRARY) return;
    l->free_fn(l->made);
    dlclose(l->dl);
    l->magic = MAGIC_FREED;
    free(l);
}
