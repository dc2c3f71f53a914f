// What a truncation of a shmem file costs when a 64 MiB mapping of it is
// registered with userfaultfd write-protect (async) and armed, as the
// shim's shadows are (BENCHMARKS.md, session 10): MODE 0 = no userfaultfd,
// 1 = armed over the file's size, 2 = over the whole mapping; a second
// argument disarms the cut range before each shrink.
//
//   cc -O2 -o shmem_truncate_uffd shmem_truncate_uffd.c && ./shmem_truncate_uffd MODE [u]
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <linux/userfaultfd.h>
#include <time.h>
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1<<13)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1<<15)
#endif
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec*1e9+t.tv_nsec;}
int main(int argc,char**argv){
  int mode=atoi(argv[1]); int unp=argc>2; int u=-1; // 0 no uffd, 1 uffd-wp async armed within file, 2 armed whole mapping
  size_t M=64<<20, big=9453568, small=6300056;
  int fd=open("/dev/shm/tzfile",O_RDWR|O_CREAT|O_TRUNC,0600); ftruncate(fd,big);
  char*m=mmap(0,M,PROT_READ|PROT_WRITE,MAP_SHARED,fd,0);
  for(size_t o=0;o<big;o+=4096) m[o]=1;
  if(mode){
    u=syscall(SYS_userfaultfd,O_CLOEXEC|O_NONBLOCK);
    struct uffdio_api api={.api=UFFD_API,.features=UFFD_FEATURE_WP_ASYNC|UFFD_FEATURE_WP_HUGETLBFS_SHMEM|UFFD_FEATURE_WP_UNPOPULATED};
    if(ioctl(u,UFFDIO_API,&api)){perror("api");return 1;}
    struct uffdio_register r={.range={(unsigned long)m,M},.mode=UFFDIO_REGISTER_MODE_WP};
    if(ioctl(u,UFFDIO_REGISTER,&r)){perror("reg");return 1;}
    struct uffdio_writeprotect w={.range={(unsigned long)m,mode==1?big:M},.mode=UFFDIO_WRITEPROTECT_MODE_WP};
    if(ioctl(u,UFFDIO_WRITEPROTECT,&w)){perror("wp");return 1;}
  }
  double ts=0,tg=0; int n=2000;
  for(int i=0;i<n;i++){
    m[small-100]=i; m[small+5000]=1; // touch near the cut, like KC
    double t0=now(); if(unp&&u>=0){struct uffdio_writeprotect w={.range={(unsigned long)m+((small+4095)&~4095UL),M-((small+4095)&~4095UL)},.mode=UFFDIO_WRITEPROTECT_MODE_DONTWAKE}; if(ioctl(u,UFFDIO_WRITEPROTECT,&w))perror("unp");} ftruncate(fd,small); double t1=now(); ftruncate(fd,big); double t2=now();
    ts+=t1-t0; tg+=t2-t1;
  }
  printf("mode %d: shrink %.1f us, grow %.1f us\n",mode,ts/n/1000,tg/n/1000);
}
