package kubetest

import "k8s.io/apimachinery/pkg/util/intstr"

func intOrName(name string) intstr.IntOrString { return intstr.FromString(name) }
